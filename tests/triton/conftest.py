"""The real tritonserver fixture (``server``) lives in tests/conftest.py, shared with the frontend tests."""

from tests.conftest import MODELS, REPOSITORY

__all__ = ["MODELS", "REPOSITORY"]
