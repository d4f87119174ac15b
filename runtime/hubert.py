"""Speech -> phonetic units at 25 Hz with the exported HuBERT + quantizer (``hubert.onnx``).

One ONNX Runtime session: audio [1, samples] -> units int64 [frames] (0..499, or 500
only if a chunk is all CTC blanks), long audio cut into chunks as the reference does
(:class:`~spiritlm_edge.runtime.encoder.UnitEncoder`).
"""

from __future__ import annotations

from spiritlm_edge.runtime.encoder import UnitEncoder


class HubertEngine(UnitEncoder):
    """``engine(audio) -> units``: 16 kHz mono speech to HuBERT units (int64, 25 per second)."""

    component = "hubert"
    output = "units"
