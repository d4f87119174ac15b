"""Speech -> style units at 1 Hz (Expressive) with the exported wav2vec2 classifier (``style.onnx``).

audio [1, samples] -> styles int64 [ceil(frames / 50)] (0..99). The graph normalises
the waveform itself (zero mean, unit variance, as the reference's feature extractor does),
so each 100 s chunk is normalised on its own, like the reference.
"""

from __future__ import annotations

from spiritlm_edge.runtime.encoder import UnitEncoder


class StyleEngine(UnitEncoder):
    """``engine(audio) -> styles``: 16 kHz mono speech to style units (int64, one per second)."""

    component = "style"
    output = "styles"
