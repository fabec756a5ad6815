"""Build for qgnn-deploy.

The C++ kernels (csrc/) are compiled into ``qgnn_deploy._C`` with pybind11 only:
no torch headers, so the build needs no torch and is the same for CPU and CUDA
torch builds. ISA-specific code is compiled with per-function target attributes
and chosen at run time, so a wheel built on an AVX-512 machine still runs on AVX2.

``kernels/`` and ``export/`` stay top-level folders in the repository and install
as ``qgnn_deploy.kernels`` / ``qgnn_deploy.export``.
"""
import glob
import os
import sys

from setuptools import setup
from pybind11.setup_helpers import Pybind11Extension, build_ext

SANITIZE = os.environ.get("QGNN_SANITIZE", "")  # e.g. "address,undefined"

# -ffp-contract=off: the fp32 epilogue must not fuse into FMAs, so it stays bit-identical
# to the reference's op order. Threads come from csrc/thread_pool.cpp, not OpenMP.
extra_compile = ["-O3", "-std=c++17", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
extra_link = ["-pthread"]
if SANITIZE:
    extra_compile = ["-O1", "-g", "-std=c++17", "-pthread", "-ffp-contract=off",
                     f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer",
                     "-fno-sanitize-recover=undefined"]
    extra_link = ["-pthread", f"-fsanitize={SANITIZE}"]

ext_modules = [
    Pybind11Extension(
        "qgnn_deploy._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.inc")),
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        cxx_std=17,
    )
]

install_requires = [
    "torch>=2.4",
    "numpy>=1.24",
    "safetensors>=0.4",
    "onnx>=1.17",
    "onnxruntime>=1.20",
    "onnxscript>=0.2",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    'triton==3.9.0; platform_system == "Linux" and platform_machine == "x86_64"',
]

setup(
    name="qgnn-deploy",
    version="0.1.0",
    description="Integer inference for Pauta-quantized DPGN few-shot classifiers (QGNN-IC)",
    python_requires=">=3.10",
    packages=[
        "qgnn_deploy",
        "qgnn_deploy.models",
        "qgnn_deploy.quant",
        "qgnn_deploy.ops",
        "qgnn_deploy.backends",
        "qgnn_deploy.data",
        "qgnn_deploy.training",
        "qgnn_deploy.commands",
        "qgnn_deploy.benchmarks",
        "qgnn_deploy.serving",
        "qgnn_deploy.kernels",
        "qgnn_deploy.export",
    ],
    package_dir={
        "qgnn_deploy": "qgnn_deploy",
        "qgnn_deploy.kernels": "kernels",
        "qgnn_deploy.export": "export",
    },
    package_data={"qgnn_deploy": ["assets/*.pt", "assets/*.json", "assets/*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "pytest-xdist>=3",
                 "tritonclient[grpc]>=2.40"],
        "serve": ["ray[serve]>=2.40"],
    },
    entry_points={"console_scripts": ["qgnn-deploy=qgnn_deploy.cli:main"]},
)
