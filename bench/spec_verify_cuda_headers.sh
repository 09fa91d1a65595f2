#!/bin/bash
# Fills .gpu/ (ignored by git) with the headers bench/spec_verify_cuda.py compiles on a GPU
# machine that has no SGLang or flashinfer: SGLang's two verify-kernel headers from the
# installed sglang, and the include folder of the flashinfer_python wheel sglang pins.
# Run here, in the project's venv (network needed once), then carry .gpu to the device.
set -euo pipefail
cd "$(dirname "$0")/.."
SG=$(python -c "import os, sglang; print(os.path.dirname(sglang.__file__))")
FI=$(python -c "from importlib.metadata import requires
print(next(r.split('==')[1].split(';')[0].strip() for r in requires('sglang') if r.startswith('flashinfer_python')))")
mkdir -p .gpu/sgl/sgl_kernel/speculative .gpu/fi
cp "$SG"/kernels/jit/include/sgl_kernel/speculative/{sampling,eagle}.cuh .gpu/sgl/sgl_kernel/speculative/
python -c "import sglang; print(sglang.__version__)" > .gpu/sgl/VERSION
tmp=$(mktemp -d)
pip download -q --no-deps -d "$tmp" "flashinfer_python==$FI"
unzip -q -o "$tmp"/flashinfer_python-*.whl 'flashinfer/data/include/*' -d .gpu/fi
echo "$FI" > .gpu/fi/VERSION
rm -rf "$tmp"
du -sh .gpu
