"""Triton Python-backend entry point. Everything lives in the importable minicpmv_triton package."""

from minicpmv_triton.backend import TritonPythonModel  # noqa: F401
