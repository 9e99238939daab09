#!/usr/bin/env bash
# Put the wheels a GPU device call needs into .whl/ (git-ignored), on the session machine.
#
# Usage, from the repository root, on the session machine (it needs PyPI):
#     bash benchmarks/fetch_device_wheels.sh
#
# The device image (Python 3.12, no network) lacks astropy and Dask. This copies the
# astropy wheels from ../shared/device-wheels/ and downloads a pinned, consistent Dask set
# for dask-cuda (benchmarks/dask_cuda_check.py) and pytest-timeout (so a hanging GPU test
# names itself): only the packages the image does not hold,
# since a carried copy of an image package would shadow the image's own. The device call
# then names `.whl` in `carry` and starts with
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#         && export PYTHONPATH=/tmp/site:$PWD
# The whole carried tree must stay under 64 MiB; these wheels take about 23 MB.

set -euo pipefail

die() { echo "fetch_device_wheels: $*" >&2; exit 1; }

[[ -f pyproject.toml && -d gpumatch ]] || die "run it from the gpumatch repository root"
SHARED=../shared/device-wheels
compgen -G "$SHARED/*.whl" > /dev/null || die "no wheels in $SHARED (astropy for the device)"

# dask-cuda 26.10.0 pins rapids-dask-dependency 26.10.*, which pins dask and distributed
# 2026.7.1 and bokeh<3.10; the rest are the requirements missing from the device image
# (which has click, cloudpickle, cuda-core, fsspec, jinja2, msgpack, narwhals, numpy,
# nvidia-ml-py, packaging, pandas, pillow, psutil, pyyaml, sortedcontainers, toolz, ...).
PINNED=(
    dask-cuda==26.10.0
    rapids-dask-dependency==26.10.0
    dask==2026.7.1
    distributed==2026.7.1
    bokeh==3.9.2
    xyzservices==2026.9.1
    tornado==6.6.1
    zict==3.0.0
    tblib==3.2.2
    partd==1.4.2
    locket==1.0.0
    pytest-timeout==2.4.0
)

mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
cp -f "$SHARED"/*.whl .whl/

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${PINNED[@]}" \
    || die "pip download failed (network? a pinned version gone from PyPI?)"

# Every pinned wheel is there, and no distribution has two wheels (they stop the install).
missing=()
for pin in "${PINNED[@]}"; do
    name=${pin%%==*} version=${pin#*==}
    compgen -G ".whl/${name//-/_}-${version}-*.whl" > /dev/null || missing+=("$pin")
done
(( ${#missing[@]} == 0 )) || die "missing wheels: ${missing[*]}"
dups=$(for f in .whl/*.whl; do b=${f##*/}; echo "${b%%-*}" | tr 'A-Z-.' 'a-z__'; done \
    | sort | uniq -d)
[[ -z $dups ]] || die "several wheels of: $dups (remove the stale ones from .whl/)"

total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
ls -l .whl/
echo "fetch_device_wheels: $(ls .whl/*.whl | wc -l) wheels, $(( total / 1024 )) KiB in .whl/"
(( total < 56 * 1024 * 1024 )) || die "wheels over 56 MiB: the carried tree may pass 64 MiB"
