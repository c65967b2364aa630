"""Build entry of sfg_fast.

The Triton kernels in ``kernels/`` are installed as the subpackage ``sfg_fast.kernels``.
The compiled extension ``sfg_fast._C`` (sources in ``csrc/``) is optional: it is built only
when sources exist and the build succeeds; without it the package imports and works, and
``python -m sfg_fast.info`` reports why it is missing. Set SFG_FAST_BUILD_EXT=0 to skip it.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """Return (ext_modules, cmdclass) for sfg_fast._C, or empty when it cannot be built."""
    if os.environ.get("SFG_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch absent in the build environment: pure-Python install
        print(f"sfg_fast: skipping sfg_fast._C ({exc!r})")
        return [], {}
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # torch >= 2.13 headers use C++20 features (they warn under C++17); the .cu files stay C++17.
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())
    extra = {"cxx": ["-O3", "-std=c++20" if version >= (2, 13) else "-std=c++17", "-fopenmp"]}
    link = ["-fopenmp"]
    if os.environ.get("SFG_FAST_SANITIZE", "0") == "1":
        # AddressSanitizer + UBSan build for testing only (slow). Python itself is not instrumented,
        # so run it with LD_PRELOAD="$(gcc -print-file-name=libasan.so)" and
        # ASAN_OPTIONS=detect_leaks=0 (torch's own libraries hold allocations until exit).
        # tests/test_asan.py builds the same flags into a temporary folder instead.
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        extra["cxx"] = [f for f in extra["cxx"] if f != "-O3"] + ["-O1", "-g"] + sanitize
        link += sanitize
    if torch.version.cuda is not None and cu_sources:
        extra["nvcc"] = ["-O3", "-std=c++17"]   # no fast math: the optimizer update must round like torch
        ext = CUDAExtension("sfg_fast._C", cpp_sources + cu_sources, extra_compile_args=extra,
                            define_macros=[("SFG_FAST_WITH_CUDA", "1")], extra_link_args=link)
    else:
        ext = CppExtension("sfg_fast._C", cpp_sources, extra_compile_args=extra,
                           extra_link_args=link)
    class OptionalBuildExtension(BuildExtension):
        """Build sfg_fast._C, but never fail the install: without it the package still works."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, ABI mismatch, ...: fall back to pure Python
                self._warn(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._warn(exc)

        @staticmethod
        def _warn(exc):
            print(f"sfg_fast: WARNING: could not build sfg_fast._C ({exc!r}); the package works without it, "
                  "see `python -m sfg_fast.info`")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sfg_fast",
    version="0.1.0",
    description="Fast, exact Supervised Feature Generation (SFG) layers and models for CTR prediction",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["sfg_fast", "sfg_fast.ops", "sfg_fast.models", "sfg_fast.data", "sfg_fast.kernels", "sfg_fast.integrations"],
    package_dir={"sfg_fast": "sfg_fast", "sfg_fast.kernels": "kernels"},
    package_data={"sfg_fast": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0"],
    },
    entry_points={"console_scripts": ["sfg-fast=sfg_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
