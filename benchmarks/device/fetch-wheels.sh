#!/usr/bin/env bash
# Fetch, on this machine, the wheels the GPU benchmark needs on a lent device machine (Python 3.12, torch
# already there, no network there): the packages btd imports beyond torch, numpy, scipy and prometheus_client,
# at the versions of this checkout's .venv, into .whl/ (ignored by git; carried with `carry: [".whl"]`).
#
#   benchmarks/device/fetch-wheels.sh        # then, with a device: see gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=(pydicom pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
          typing-extensions pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle tqdm)
for name in "${packages[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
        --platform manylinux_2_35_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$(version "$name")"
done
# The slices the CPU figures were measured on (LIDC-IDRI-0001, CC BY 3.0), when the shared data is here: the
# device machine sees only the repository and what is carried.
lidc=../shared/data/chest-ct/lidc-idri/LIDC-IDRI-0001
if [ -d "$lidc" ]; then mkdir -p .whl/lidc-idri-0001 && cp "$lidc"/*.dcm .whl/lidc-idri-0001/; fi
du -sh .whl && ls .whl
