"""File-level matching: read, match, write (used by the command line)."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import time

import numpy as np

from .config import ModelPsfMatchConfig
from .errors import ConfigError, GpumatchError

log = logging.getLogger("gpumatch")

__all__ = ["load_config", "parse_overrides", "find_psf", "header_psf_card", "resolve_psf", "match_file",
           "output_path_for", "read_exposure_with_psf", "output_conflict"]

#: Header cards that may name an exposure's PSF file (relative to the exposure).
PSF_HEADER_KEYS = ("PSF_FILE", "PSFFILE", "PSFMODEL")
#: File names next to ``<stem>.fits`` that are taken as its PSF model.
PSF_SIDECARS = ("{stem}.psf", "{stem}_psfcat.psf", "{stem}_psf.fits", "{stem}.psf.fits")


def _parse_value(text):
    # TOML and shell habits: true/false as well as Python's True/False.
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items):
    """``["field=value", ...]`` to a dict; values are Python literals or strings."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set kernelSize=25")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def load_config(path=None, overrides=None):
    """A validated config from an optional TOML file plus ``field=value`` overrides.

    The TOML file holds docs/algorithm.md section 2 field names at top level or in a
    ``[config]`` table.
    """
    values = {}
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
        values.update(_config_table(data, path))
    values.update(overrides or {})
    try:
        return ModelPsfMatchConfig.from_dict(values)
    except ConfigError as exc:
        where = f"config file {path}" if path else "configuration"
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"configuration: {exc}") from None


def _config_table(data, path):
    """The configuration fields of a TOML document: its ``[config]`` table or its top level.

    Both at once is refused rather than one silently dropped.
    """
    if "config" not in data:
        return data
    if not isinstance(data["config"], dict):
        raise ConfigError(f"config file {path}: 'config' must be a [config] table")
    others = sorted(k for k in data if k != "config")
    if others:
        raise ConfigError(
            f"config file {path}: has a [config] table and top-level fields ({', '.join(others)}); "
            "put every field in the [config] table, or all at the top level")
    return data["config"]


#: Model prefix of a bare PSF file path, by its extension.
PSF_FILE_KINDS = {".psf": "psfex", ".fits": "image", ".fit": "image", ".fits.gz": "image",
                  ".piff": "piff"}


def _with_prefix(path):
    """``KIND:path`` for a PSF file named without a prefix, chosen by its extension."""
    lower = path.lower()
    for ext, kind in sorted(PSF_FILE_KINDS.items(), key=lambda kv: -len(kv[0])):
        if lower.endswith(ext):
            return f"{kind}:{path}"
    raise ValueError(
        f"PSF file {path!r}: cannot tell what it holds from its name; a PSF file ends in .psf "
        "(PSFEx), .fits (PSF image) or .piff (Piff), or say it with a prefix: psfex:PATH, "
        "image:PATH or piff:PATH")


def resolve_psf(spec):
    """A PSF model from a string (``gaussian:...``, ``psfex:PATH``, a path) or a model.

    A string without ``NAME:`` is a PSF file, read by its extension (:data:`PSF_FILE_KINDS`).
    """
    if not isinstance(spec, str):
        return spec
    from .psf import parse_psf

    if ":" not in spec and ("." in spec or "/" in spec or os.path.exists(spec)):
        spec = _with_prefix(spec)  # a file name; a bare word ("gaussian") is a model name
    return parse_psf(spec)


def find_psf(exposure_path, header=None, psf_from_header=False):
    """The PSF model file of an exposure: named by its header (if asked) or next to it.

    This is the one place that decides where an exposure's PSF file comes
    from. A header card (``PSF_FILE``, ``PSFFILE``, ``PSFMODEL``) is followed
    only when ``psf_from_header`` is True, and then only to a regular file of
    at most :data:`gpumatch.io.safety.MAX_NAMED_FILE_BYTES` named by a
    relative path inside the exposure's directory; the sidecar files
    (:data:`PSF_SIDECARS`) are found by their names, not by the header.

    Returns
    -------
    str or None
        The path, or None.

    Raises
    ------
    UnsafePathError
        ``psf_from_header`` and the card names no file gpumatch will read
        (one wording for every reason, so it does not reveal which files exist).
    """
    from .io.safety import MAX_NAMED_FILE_BYTES, UnsafePathError, confined_file

    directory = os.path.dirname(os.path.abspath(exposure_path))
    card = header_psf_card(header)
    if psf_from_header and card is not None:
        key, value = card
        found = confined_file(directory, value)
        if found is None:
            raise UnsafePathError(
                f"{exposure_path}: header card {key} = {str(value)!r} is not a PSF file "
                f"gpumatch will read (it must be a relative path to a regular file of at most "
                f"{MAX_NAMED_FILE_BYTES // 2 ** 20} MiB inside {directory}); fix the card or "
                "give --psf MODEL")
        return found
    stem = os.path.basename(exposure_path)
    for ext in (".fits.fz", ".fits.gz", ".fits", ".fit"):
        if stem.lower().endswith(ext):
            stem = stem[:-len(ext)]
            break
    for pattern in PSF_SIDECARS:
        candidate = os.path.join(directory, pattern.format(stem=stem))
        if os.path.isfile(candidate):  # a FIFO or device there would block or never end
            return candidate
    return None


def header_psf_card(header):
    """``(key, value)`` of the first header card that names a PSF file, or None."""
    for key in PSF_HEADER_KEYS:
        if header is not None and key in header:
            return key, header[key]
    return None


def _psf_from_file(path):
    return resolve_psf(_with_prefix(path))


def read_exposure_with_psf(path, psf=None, *, psf_hint="give --psf MODEL", empty=None,
                           psf_from_header=False, header_hint="pass --psf-from-header"):
    """Read the exposure at ``path`` and give it a PSF model.

    The PSF is ``psf`` (a model or its string form) when given, else the one
    read with the exposure, else the file lying next to the exposure or, with
    ``psf_from_header``, named by a ``PSF_FILE`` header card (:func:`find_psf`).

    ``psf_hint`` is the first remedy the error for an exposure without a PSF
    suggests (how the caller's user passes one); None leaves it out.
    ``header_hint`` is how that user turns ``psf_from_header`` on.
    ``empty`` allocates the planes (see :func:`gpumatch.io.fits.read_exposure`).

    Raises
    ------
    GpumatchError
        No PSF model was found.
    """
    from .exposure import Exposure

    path = os.fspath(path)
    exposure = Exposure.read_fits(path, empty=empty)
    exposure.psf, exposure.psf_source = exposure_psf(exposure, path, psf, psf_hint,
                                                     psf_from_header, header_hint)
    return exposure


def exposure_psf(exposure, path, psf=None, psf_hint="give --psf MODEL", psf_from_header=False,
                 header_hint="pass --psf-from-header"):
    """``(model, source)``: the PSF of the exposure read from ``path``, and where it came from.

    The order: ``psf`` (the caller's, ``"--psf"``), then the model archived in
    the file itself (``"archive (PcaPsf)"``), then a PSF file lying next to the
    exposure or, with ``psf_from_header``, named by a header card
    (``"file NAME"``, :func:`find_psf`). ``psf_hint`` and ``header_hint`` are
    how the caller's user passes a PSF and turns ``psf_from_header`` on.
    """
    if psf is not None:
        return resolve_psf(psf), "--psf"
    if exposure.psf is not None:
        return exposure.psf, exposure.psf_source or "exposure"
    archive = getattr(exposure, "archive", None)
    problem = getattr(archive, "psf_problem", None)
    found = find_psf(path, exposure.meta, psf_from_header=psf_from_header)
    if found is None:
        if problem:
            raise GpumatchError(problem)
        hint = f"{psf_hint}, " if psf_hint else ""
        card = header_psf_card(exposure.meta)
        named = (f"{header_hint} to read the file its {card[0]} card names, "
                 if card is not None else "put a PSF_FILE card in the header (and "
                 f"{header_hint}), ")
        raise GpumatchError(
            f"{path}: no PSF model; {hint}{named}or place a "
            f"PSFEx file next to it ({', '.join(p.format(stem='<stem>') for p in PSF_SIDECARS)})")
    if problem:
        log.info("%s; using %s instead", problem, found)
    return _psf_from_file(found), f"file {os.path.basename(found)}"


def output_path_for(path, output_dir=None, output=None):
    """Where the matched exposure of ``path`` goes."""
    if output is not None:
        return output
    if output_dir is None:
        raise ValueError("give --output-dir DIR (or -o FILE for a single input)")
    return os.path.join(output_dir, os.path.basename(path))


def check_output(path, output, overwrite):
    """Refuse outputs that would replace an input or an existing file (unless asked).

    The input must exist and not be ``output`` itself; the rest (an existing
    ``output`` without ``overwrite``, a missing directory, a directory at
    ``output``) is :func:`gpumatch.io._atomic.check_output_path`'s.
    """
    from .io._atomic import check_output_path

    if not os.path.exists(path):
        # Said before the output checks, which would otherwise hide it (and
        # os.path.samefile would fail with a bare errno message).
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if os.path.exists(output) and os.path.samefile(path, output):
        raise FileExistsError(
            f"{output}: is the input itself; choose another --output-dir or -o so the input "
            "is kept")
    return check_output_path(output, overwrite, "exposure")


#: Per-file summary fields: the result metadata they come from (when the task
#: provides it), and the output's primary-header card that keeps them for later
#: runs' summaries.
VERDICT_FIELDS = {"verdict": ("matchQuality", "GPM_QUAL"),
                  "verdict_reason": ("matchQualityReason", "GPM_QRSN"),
                  "noise_variance_gain": ("noiseVarianceGain", "GPM_NVG")}


def _record_verdict(metadata, meta, summary):
    """Copy the verdict fields present in ``metadata`` to the summary and the header."""
    for name, (key, card) in VERDICT_FIELDS.items():
        value = metadata.get(key)
        if value is not None:
            summary[name] = value
            meta[card] = value


def kernel_path_for(output):
    """Where ``--save-kernel`` writes the kernel of the matched exposure ``output``."""
    return os.path.splitext(output)[0] + ".kernel.fits"


def _check_side_outputs(output, save_kernel, plots_dir, overwrite):
    """Refuse, before any work, a kernel file or figure directory that cannot be written."""
    from .io._atomic import check_directory_writable, check_output_path

    if save_kernel:
        check_output_path(kernel_path_for(output), overwrite, "kernel")
    if plots_dir and os.path.isdir(plots_dir):
        check_directory_writable(plots_dir, "figures")


def match_file(path, reference, output, psf=None, config=None, backend="auto", kernel_sum=1.0,
               save_kernel=False, plots_dir=None, overwrite=False, task=None, compress=None,
               on_poor_match="warn", psf_from_header=False):
    """Read one exposure, PSF-match it and write the result atomically.

    Parameters
    ----------
    path : str
        Input exposure (FITS).
    reference : Psf or str
        Reference PSF model or its string form.
    output : str
        Output FITS path.
    psf : Psf or str, optional
        The exposure's PSF; otherwise the file's archived PSF, else a PSF file
        (:func:`exposure_psf`).
    compress : bool, optional
        Tile-compress the output losslessly (default: ``output`` ends in ``.fz``).
    on_poor_match : {"warn", "raise", "ignore"}
        As for :meth:`ModelPsfMatchTask.run`; a poor match's output is
        written unless this is ``"raise"``.
        With ``psf_from_header``, a file its header names may be read too
        (:func:`find_psf`).

    Returns
    -------
    dict
        Summary: input, output, status, kernel sum, condition number,
        residuals, the verdict (``verdict``, ``verdict_reason``), timings.
    """
    from .recommend import task_for_exposure
    from .task import ModelPsfMatchTask

    t0 = time.perf_counter()
    # Refused before any work (the input missing or being the output, an
    # existing output without overwrite, a missing directory).
    check_output(path, output, overwrite)
    _check_side_outputs(output, save_kernel, plots_dir, overwrite)
    task = task or ModelPsfMatchTask(config, backend=backend)
    # On the GPU the planes are read into pinned memory: copied to it without staging.
    exposure = read_exposure_with_psf(path, psf, empty=task.array_backend.empty_host,
                                      psf_from_header=psf_from_header)
    reference = resolve_psf(reference)
    task = task_for_exposure(task, exposure, reference)  # the recommended mode
    result = task.run(exposure, reference, kernelSum=kernel_sum, on_poor_match=on_poor_match)
    md = result.metadata
    result.psfMatchedExposure.meta.update({
        # Kernel sum at the region centre, spatial condition number, worst
        # matched-PSF relative L2 residual.
        "GPM_KSUM": md["spatialKernelSum"],
        "GPM_COND": md["spatialConditionNum"],
        "GPM_RESL2": md["matchedPsfRelL2Max"],
    })
    summary = {
        "input": path, "output": output, "status": "ok",
        "kernel_sum": md["spatialKernelSum"], "condition_number": md["spatialConditionNum"],
        "residual_l2_median": md["matchedPsfRelL2Median"], "residual_l2_max": md["matchedPsfRelL2Max"],
        "fwhm_ratio_median": md["matchedPsfFwhmRatioMedian"],
        "fwhm_ratio_worst": md["matchedPsfFwhmRatioWorst"],
        "candidates": md["numUsedCandidates"],
        "psf_source": exposure.psf_source,  # --psf, the file's archive, or a PSF file
    }
    _record_verdict(md, result.psfMatchedExposure.meta, summary)
    written = []
    try:
        if save_kernel:
            kpath = kernel_path_for(output)
            result.psfMatchingKernel.write_fits(kpath, overwrite=overwrite,
                                                config=task.config.to_dict())
            written.append(kpath)
            summary["kernel"] = kpath
        if plots_dir:
            from .plots import save_diagnostic_figures

            stem = os.path.splitext(os.path.basename(output))[0]
            summary["plots"] = save_diagnostic_figures(result, plots_dir, exposure=exposure,
                                                       prefix=f"{stem}_", overwrite=overwrite)
            written.extend(summary["plots"])
        # The exposure goes last: its presence means the whole job finished.
        extra = {} if compress is None else {"compress": compress}  # None: by the name
        result.psfMatchedExposure.write_fits(output, overwrite=overwrite, **extra)
    except BaseException:
        for p in written:
            if os.path.exists(p):
                os.unlink(p)
        raise
    summary["seconds"] = time.perf_counter() - t0
    return summary


# -- may an existing output be kept? ---------------------------------------------------


def _config_changes(recorded, wanted):
    """``"field old -> new"`` for every field that differs."""
    if not isinstance(recorded, dict):
        return ["not recorded"]
    out = []
    for name in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(name, "(absent)"), wanted.get(name, "(absent)")
        same = old == new or (isinstance(old, float) and isinstance(new, float)
                              and math.isnan(old) and math.isnan(new))
        if not same:
            out.append(f"{name} {old!r} -> {new!r}")
    return out


def output_conflict(output, input_path, reference, config, kernel_sum=1.0, psf=None):
    """Why the existing gpumatch output ``output`` is not this run's result, or ``""``.

    It reads the record :mod:`gpumatch.provenance` wrote; it sits here, with
    :func:`resolve_psf` and the configuration it compares, so that the provenance
    module (which the FITS writer uses) imports neither.

    The output is this run's when it records the same input (the SHA-256 of
    ``input_path``), the same reference (description, and stamp at the image
    centre), the same configuration (every field), the same kernel sum and,
    when ``psf`` is given, the same exposure PSF description. The date,
    version and backend are not compared.

    Parameters
    ----------
    output, input_path : str
    reference : Psf or str
    config : ModelPsfMatchConfig or None (the default configuration)
    kernel_sum : float
    psf : Psf or str, optional

    Returns
    -------
    str
        What differs, to follow "OUTPUT exists but" (one line), or ``""``
        when the output may be kept.
    """
    from astropy.io import fits

    from ._warnings import quiet
    from .provenance import REFPSF, _config_mode, _same_stamp, file_sha256, header_record
    from .psf.parse import psf_description

    with quiet(), fits.open(output, memmap=False) as hdul:
        prov = header_record(hdul[0].header)
        stamp, where = None, (0, 0)
        if REFPSF in hdul:
            h = hdul[REFPSF]
            stamp = None if h.data is None else np.array(h.data, dtype=np.float64)
            where = (h.header.get("GPM_X", 0), h.header.get("GPM_Y", 0))
    if prov is None:
        return "records no provenance (written by an older gpumatch or another program)"
    checksum = file_sha256(input_path)
    if prov.get("inputSha256") != checksum:
        return (f"was made from another input ({prov.get('input') or 'in-memory'} with "
                f"SHA-256 {str(prov.get('inputSha256'))[:12]}..., {input_path} has "
                f"{checksum[:12]}...)")
    model = resolve_psf(reference)
    description = psf_description(model)
    if prov.get("reference") != description:
        return f"was matched to reference {prov.get('reference')}, not {description}"
    if stamp is not None:
        again = np.asarray(model.compute_kernel_image(float(where[0]), float(where[1])))
        if not _same_stamp(again, stamp):
            return (f"was matched to a reference {description} that rendered differently "
                    f"at ({where[0]}, {where[1]}) (has the model file changed?)")
    config = config if config is not None else ModelPsfMatchConfig()
    mode = _config_mode(config)
    if mode["mode"] == "recommended":
        # The fields follow from the input and reference checked above: the
        # choice itself (and its overrides) is what this run would repeat.
        if prov.get("configMode") != mode:
            return (f"was made with configuration {prov.get('configMode') or {'mode': 'given'}}, "
                    f"not {mode}")
    else:
        # Through JSON, as recorded: tuples become lists, the comparison is of values.
        changes = _config_changes(prov.get("config"), json.loads(json.dumps(config.to_dict())))
        if changes:
            return f"was made with another configuration ({'; '.join(changes)})"
    if prov.get("kernelSum") != float(kernel_sum):
        return f"was made with kernel sum {prov.get('kernelSum')}, not {float(kernel_sum)}"
    if psf is not None:
        wanted_psf = psf_description(resolve_psf(psf))
        if prov.get("psf") != wanted_psf:
            return f"was made with exposure PSF {prov.get('psf')}, not {wanted_psf}"
    # A PSF model file (given or a sidecar; PSFEx, Piff, ...) rewritten since,
    # e.g. by a new PSFEx run: same name, other model.
    recorded, model_file = prov.get("psfSha256"), prov.get("psfFile")
    if recorded and model_file:
        now = file_sha256(model_file) if os.path.isfile(model_file) else None
        if now != recorded:
            return (f"was made with exposure PSF file {model_file} (SHA-256 {recorded[:12]}...), "
                    f"which has changed since ({'now ' + now[:12] + '...' if now else 'gone'})")
    return ""

