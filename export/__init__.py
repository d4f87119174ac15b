"""PyTorch definitions of the Spirit LM speech models, loaders for the released
checkpoint files, random-weight checkpoints in the release's formats and ONNX / TensorRT
export. Needs the ``export`` extra (torch). Imports only ``runtime/``, except
``export/build.py``, which assembles whole bundles through ``quant/``."""
