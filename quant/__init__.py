"""The language model to GGUF (and llama.cpp quantization); int8 / fp16 ONNX variants.
Imports ``export/`` (the LM checkpoint's loaders) and ``runtime/``."""
