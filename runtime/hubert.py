"""Speech -> phonetic units at 25 Hz with the exported HuBERT + quantizer (``hubert.onnx``).

One ONNX Runtime session: audio [1, samples] -> units int64 [frames] (0..499, or 500
only if a chunk is all CTC blanks). Long audio is cut like the reference does: chunks of
at most 100 s, a trailing chunk shorter than 1280 samples is skipped, and each chunk is
encoded on its own (blank filling included), then the units are concatenated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spiritlm_edge.runtime import audio as audio_io
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.onnx_session import create_session


def _check_io(session, path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
    if missing:
        raise BundleError(
            f"{path} lacks the input/output {', '.join(missing)} (it has inputs {sorted(have_in)}, "
            f"outputs {sorted(have_out)}): it was not exported by this spiritlm-edge; rebuild the bundle."
        )


class HubertEngine:
    """``engine(audio) -> units``: 16 kHz mono speech to HuBERT units (int64, 25 per second)."""

    component = "hubert"
    output = "units"

    def __init__(self, session, entry: dict, path=None):
        _check_io(session, path, ["audio"], [self.output])
        self.session = session
        self.entry = entry
        self.hop_samples = int(entry.get("hop_samples", 640))
        self.rate_hz = float(entry.get("rate_hz", 16000 / self.hop_samples))

    @classmethod
    def from_bundle(cls, bundle: Bundle, providers=None, n_threads: int | None = None):
        path = bundle.engine_path(cls.component)  # int8 variant when present (SPIRITLM_EDGE_PRECISION)
        return cls(create_session(path, providers, n_threads), bundle.component(cls.component), path)

    def encode_chunk(self, samples: np.ndarray, output: str | None = None) -> np.ndarray:
        """Run the graph on one chunk (already checked, at most 100 s)."""
        batch = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        return self.session.run([output or self.output], {"audio": batch})[0]

    def __call__(self, audio: audio_io.AudioInput, sample_rate: int | None = None) -> np.ndarray:
        samples = audio_io.load_audio(audio, sample_rate)
        # MAX_CHUNK_SAMPLES is read at call time so that tests can shrink it.
        pieces = [self.encode_chunk(chunk) for chunk in audio_io.chunks(samples, audio_io.MAX_CHUNK_SAMPLES)]
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(pieces).astype(np.int64, copy=False)
