"""The torch-free runtime: ONNX Runtime speech engines, the llama.cpp LM and the pipeline.

Nothing in this package may import torch or the layers above it, ``export/``, ``quant/`` and
``bench/`` (``tests/test_packaging.py`` and ``tests/test_layers.py`` enforce it).
"""
