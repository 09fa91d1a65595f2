"""Print SGLang's runtime requirements for a machine without CUDA.

Reads Requires-Dist from the pinned sglang wheel's metadata (so the list follows the
pin) and drops the CUDA kernel packages that cannot import without libcuda, plus the
audio/video packages nothing here uses. torch and torchvision stay: the caller pins
them to builds that import on this machine.
Usage: python sglang_requirements.py path/to/sglang-*.whl
"""
import re
import sys
import zipfile

CUDA_ONLY = re.compile(
    r"^(apache-tvm-ffi|cuda-python|deepseek-recipe|flash-attn-4|flashinfer[-_]python|"
    r"humming-kernels|nvidia-.*|nvshmem4py.*|py-spy|quack-kernels|sgl-deep-ep|"
    r"sgl-deep-gemm|sgl-flash-mla|sglang-kernel|tilelang|torch[-_]memory[-_]saver|"
    r"torchaudio|torchcodec)$",
    re.I,
)


def requirements(wheel_path):
    with zipfile.ZipFile(wheel_path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist: ") or "extra ==" in line:
            continue
        req = line[len("Requires-Dist: "):]
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        if not CUDA_ONLY.match(name):
            yield req


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
