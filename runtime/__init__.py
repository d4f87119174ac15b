"""The torch-free runtime: ONNX Runtime speech engines, the llama.cpp LM, the pipeline and CLI.

Nothing in this package may import torch (``tests/test_packaging.py`` enforces it).
"""
