"""igds_fast: a fast, faithful backend for Information-Guided Diffusion Sampling (IGDS).

Import names: the top-level folders `kernels/` and `profiling/` install as the subpackages
`igds_fast.kernels` and `igds_fast.profiling`. A bare top-level `kernels` would collide with the
PyPI package of that name (Hugging Face's `kernels`), and `profiling` is a generic name too.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["igds_fast", "igds_fast.*"])
packages += ["igds_fast.kernels", "igds_fast.profiling"]

setup(
    name="igds_fast",
    version="0.1.0",
    description="Fast Information-Guided Diffusion Sampling (IGDS) for dataset distillation",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"igds_fast.kernels": "kernels", "igds_fast.profiling": "profiling"},
    package_data={"igds_fast": ["data/*.txt", "data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pillow>=9.0",
    ],
    extras_require={
        "diffusers": ["diffusers>=0.27"],
        "digits": ["scikit-learn>=1.2"],
        # ONNX export of the UNet (igds-fast export-unet); onnxruntime checks the exported graph.
        "onnx": ["onnx>=1.15", "onnxscript>=0.2", "onnxruntime>=1.17"],
        "nvtx": ["nvtx>=0.2"],
        # GPU-only extras: never required, never imported at module load.
        "xformers": ["xformers"],
        "tensorrt": ["tensorrt"],
        # Tests also use guided-diffusion-sdk==1.0.0 (the original code, as a reference), installed
        # with --no-deps by .ci/run because its declared deps (blobfile, mpi4py) are not needed.
        "test": ["pytest>=7", "scikit-learn>=1.2"],
    },
    entry_points={"console_scripts": ["igds-fast=igds_fast.cli:main"]},
)
