"""docs/algorithm.md: its section numbering, and every reference to it from the code.

Code, kernels, benchmarks and tests cite the document as
``docs/algorithm.md section N`` or ``section N.M``; each such number must be a
heading of the document. The repository must not cite documents it does not
hold (an outside specification, or issue numbers of a tracker).
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ALGORITHM = DOCS / "algorithm.md"
#: Where citations of the document are looked for.
CITING_DIRS = ("gpumatch", "kernels", "benchmarks", "tests", "docs")
#: Where outside references are not allowed.
PRODUCT_DIRS = ("gpumatch", "kernels")
TEXT_SUFFIXES = {".py", ".cu", ".h", ".md", ".sh", ".toml", ".txt", ".rst", ".cfg"}

#: The top-level sections and the words each one's title must contain.
TOPICS = {
    1: "job", 2: "configuration", 3: "cell set", 4: "alard-lupton", 5: "orientation",
    6: "solving", 7: "applying", 8: "metadata", 9: "errors", 10: "reference's tests",
    11: "production",
}

_HEADING = re.compile(r"^(#{2,6})\s+(\d+(?:\.\d+)*)\.?\s+(\S.*)$", re.M)
_NUMBER = r"\d+(?:\.\d+)*"
# Comment markers and line breaks may fall between the file name and the number.
_GAP = r"(?:\s|#|//|\*)+"
_CITATION = re.compile(
    r"docs/algorithm\.md[,:]?" + _GAP + r"sections?" + _GAP
    + rf"({_NUMBER}(?:(?:{_GAP})?(?:,|and|or|to|-)(?:{_GAP})?{_NUMBER})*)")
_FOREIGN = (re.compile(r"\bSPEC\b"), re.compile(r"\bissue\s*#?\s*\d+", re.I))


def headings(text):
    """``{number: (level, title)}`` of the numbered headings of a Markdown text.

    Raises
    ------
    AssertionError
        If a number is used twice.
    """
    out = {}
    for hashes, number, title in _HEADING.findall(text):
        assert number not in out, f"section {number} is numbered twice"
        out[number] = (len(hashes), title.strip())
    return out


def citations(text):
    """Section numbers cited in ``text`` as ``docs/algorithm.md section(s) ...``,
    with the line of each: ``[(line, number), ...]``. A range ``3-7`` gives its
    two ends."""
    out = []
    for m in _CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.extend((line, n) for n in re.findall(_NUMBER, m.group(1)))
    return out


def _text_files(dirs):
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


@pytest.fixture(scope="module")
def sections():
    return headings(ALGORITHM.read_text(encoding="utf-8"))


def test_top_level_sections_keep_their_numbers_and_topics(sections):
    top = {int(n): title for n, (level, title) in sections.items() if "." not in n}
    assert sorted(top) == list(range(1, max(top) + 1)), f"top-level sections {sorted(top)}"
    assert max(top) >= 14, "sections 12-14 (quality, noise, provenance) are missing"
    for n, word in TOPICS.items():
        assert word in top[n].lower(), f"section {n} is {top[n]!r}; expected it to be about {word}"
    for n, (level, _) in sections.items():
        assert level == (2 if "." not in n else 3), f"section {n} has heading level {level}"


def test_subsections_sit_under_their_section_in_order():
    text = ALGORITHM.read_text(encoding="utf-8")
    numbers = [n for _, n, _ in _HEADING.findall(text)]
    current, last_sub = None, 0
    for n in numbers:
        parts = [int(p) for p in n.split(".")]
        if len(parts) == 1:
            assert current is None or parts[0] == current + 1, f"section {n} after {current}"
            current, last_sub = parts[0], 0
        else:
            assert parts[0] == current and parts[1] == last_sub + 1, \
                f"subsection {n} inside section {current} after {current}.{last_sub}"
            last_sub = parts[1]


def test_citation_parser():
    name = "docs/" + "algorithm.md"  # split so that the scan below does not read these
    text = (f"x (see {name} section 6.5) y\n"
            f"# ... the rule of {name}\n# section 7.\n"
            f"{name} sections 5 and 6, {name} sections 3-4; {name}: section 12\n"
            f"{name} (no section)\n")
    assert citations(text) == [(1, "6.5"), (2, "7"), (4, "5"), (4, "6"), (4, "3"), (4, "4"),
                               (4, "12")]
    known = headings("## 6. Solving\n### 6.5 Solve\n## 7. Apply\n")
    assert [n for _, n in citations(text) if n not in known] == ["5", "3", "4", "12"]


def test_every_citation_points_to_a_heading(sections):
    missing = []
    for path in _text_files(CITING_DIRS):
        if path == pathlib.Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        missing += [f"{path.relative_to(ROOT)}:{line}: section {n}"
                    for line, n in citations(text) if n not in sections]
    assert not missing, "citations of docs/algorithm.md without such a heading:\n" + \
        "\n".join(missing)


def test_product_code_cites_only_documents_it_holds():
    found = []
    for path in _text_files(PRODUCT_DIRS):
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(p.search(line) for p in _FOREIGN):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, ("cite docs/algorithm.md section N instead of SPEC or an issue number:\n"
                       + "\n".join(found))
