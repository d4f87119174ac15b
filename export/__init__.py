"""PyTorch definitions of the Spirit LM speech models, loaders for the released
checkpoint files, the tiny-checkpoint factory and ONNX / TensorRT export. Needs the
``export`` extra (torch)."""
