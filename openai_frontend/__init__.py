"""OpenAI-compatible HTTP frontend for MiniCPM-V 2.6 served by Triton. Imports no torch."""

__version__ = "0.1.0"
