"""Triton adapter for the MiniCPM-V engine: launcher and Python-backend model."""
