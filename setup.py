"""film_fast: the fastest way to run FILM (Frame Interpolation for Large Motion)."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "film_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _packages():
    # film_fast/* as usual; the top-level kernels/ folder installs as film_fast.kernels (a
    # top-level "kernels" module would collide with an unrelated PyPI package).
    found = []
    for root, label in (("film_fast", "film_fast"), ("kernels", "film_fast.kernels")):
        for dirpath, _dirs, files in os.walk(os.path.join(HERE, root)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(HERE, root))
                found.append(label if rel == "." else label + "." + rel.replace(os.sep, "."))
    return sorted(found)


PACKAGES = _packages()
PACKAGE_DIR = {p: (p.replace("film_fast.kernels", "kernels", 1) if p.startswith("film_fast.kernels")
                   else p).replace(".", "/") for p in PACKAGES}

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="film_fast",
    version=_version(),
    description="Fast, drop-in FILM frame interpolation: exact reference engine, Triton/CuPy kernels",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"film_fast": ["weights/*.safetensors", "data/*"],
                  "film_fast.kernels": ["**/*.cu", "**/*.cuh", "**/*.c"]},
    include_package_data=True,
    # torch is deliberately unpinned: GPU users install the build that matches their CUDA.
    install_requires=["torch", "numpy", "pillow", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "cuda12": ["cupy-cuda12x", "triton"],
        "cuda13": ["cupy-cuda13x", "triton"],
        "video": ["av"],
        # CI has no GPU: Triton kernels run under TRITON_INTERPRET=1 and every CuPy .cu source is
        # compiled with NVRTC (cupy's nvrtc bindings + the NVRTC library wheel).
        # scipy reads the official MatConvNet VGG-19 .mat, tensorboard's reader checks the event
        # files `film-fast train` writes: with both, those tests run in CI instead of skipping.
        "test": ["pytest", "pytest-benchmark", "triton", "cupy-cuda12x", "nvidia-cuda-nvrtc-cu12",
                 "av", "scipy", "tensorboard"],
    },
    entry_points={"console_scripts": ["film-fast = film_fast.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Multimedia :: Video",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
