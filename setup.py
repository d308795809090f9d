"""Build megatron-bpd and its C++/CUDA extension ``megatron_bpd._C``.

The CPU kernel is always built. The CUDA kernel is added when torch has CUDA and a CUDA device is visible, or when
MEGATRON_BPD_FORCE_CUDA=1 (build machines without a GPU); arches come from TORCH_CUDA_ARCH_LIST (default 8.0;9.0).
If the extension cannot be built at all (no compiler), MEGATRON_BPD_NO_EXTENSION=1 installs the pure-Python package,
which falls back to the PyTorch reference implementation at run time.
"""

import glob
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def requirements(name):
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def extension_modules():
    if os.environ.get("MEGATRON_BPD_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and (
        torch.cuda.is_available() or os.environ.get("MEGATRON_BPD_FORCE_CUDA") == "1"
    )
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(name="megatron_bpd._C", include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = CUDAExtension(sources=sources + sorted(glob.glob("csrc/cuda/*.cu")), extra_compile_args=extra,
                            define_macros=[("MEGATRON_BPD_WITH_CUDA", None)], py_limited_api=True, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args=extra, py_limited_api=True, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="megatron-bpd",
    version="0.1.0",
    description="On-policy distillation with blockwise policy-drift gating for Megatron-Core",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["megatron_bpd", "megatron_bpd.*"]),
    package_data={"megatron_bpd": ["data/*", "data/**/*"]},
    install_requires=requirements("base.txt"),
    extras_require={
        "test": requirements("test.txt"),
        # GPU machines: Transformer Engine (NVIDIA apex is built from source there; PyPI's `apex` is unrelated).
        "gpu": ["transformer-engine[pytorch]>=2.4"],
    },
    entry_points={"console_scripts": ["megatron-bpd=megatron_bpd.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
