"""Placeholder: implemented in its own issue work."""
QUANTIZE: dict = {}
DEQUANTIZE: dict = {}
