"""Triton kernels of sfg_fast (installed as ``sfg_fast.kernels``).

This folder holds ``@triton.jit`` code only: no autograd, no allocation, no shape checks.
Launchers and autograd Functions live in ``sfg_fast/ops/``. Importing this package never
imports Triton itself, so it is safe on machines without Triton or without a GPU.
"""
