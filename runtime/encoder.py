"""The engine shape the speech encoders share: one ONNX graph, 16 kHz audio in, unit ids out.

HuBERT (25 Hz phonetic units, :mod:`runtime.hubert`) and the style encoder (1 Hz styles,
:mod:`runtime.style`) differ only in their component name and output; both encode long audio
the reference's way: chunks of at most 100 s, a trailing chunk shorter than 1280 samples
skipped, each chunk encoded on its own and the ids concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from spiritlm_edge.runtime import audio
from spiritlm_edge.runtime.audio import AudioSource, load_audio
from spiritlm_edge.runtime.bundle import Bundle, EncoderConfig
from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.onnx_session import create_session, release_activations

RELEASE_AFTER_SECONDS = 15.0  # runs on longer audio return their activations (see encode_chunk)


def check_io(session: Any, path: Any, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Raise ``BundleError`` unless ``session`` has these input and output names."""
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
    if missing:
        raise BundleError(
            f"{path} lacks the input/output {', '.join(missing)} (it has inputs {sorted(have_in)}, "
            f"outputs {sorted(have_out)}): it was not exported by this spiritlm-edge; rebuild the bundle."
        )


class UnitEncoder:
    """``engine(audio) -> ids``: 16 kHz mono speech to int64 ids with one ONNX graph whose
    input is ``audio`` [1, samples]. Subclasses name their ``component`` and ``output``."""

    component: str
    output: str

    def __init__(self, session: Any, config: EncoderConfig, path: Any = None):
        check_io(session, path, ["audio"], [self.output])
        self.session = session
        self.config = config

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | os.PathLike, providers: Sequence[Any] | None = None, n_threads: int | None = None
    ):
        bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        path = bundle.engine_path(cls.component)  # int8 variant when present (SPIRITLM_EDGE_PRECISION)
        return cls(create_session(path, providers, n_threads), bundle.config(cls.component, EncoderConfig), path)

    @property
    def hop_samples(self) -> int:
        return self.config.hop_samples

    @property
    def rate_hz(self) -> float:
        return self.config.rate_hz

    def encode_chunk(self, samples: np.ndarray, output: str | None = None) -> np.ndarray:
        """Run the graph on one chunk (already checked, at most 100 s)."""
        batch = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        # Activations grow with the audio (~13 MB/s on the release-size HuBERT) and ONNX Runtime's
        # arena keeps its largest run's beside the LM: a long run hands them back at its end. A
        # short one keeps them, since re-allocating costs ~7% of the encoder's time (measured).
        long_run = batch.shape[1] > RELEASE_AFTER_SECONDS * audio.SAMPLE_RATE
        return self.session.run([output or self.output], {"audio": batch}, release_activations() if long_run else None)[
            0
        ]

    def __call__(self, source: AudioSource, sample_rate: int | None = None) -> np.ndarray:
        samples = load_audio(source, sample_rate)
        # MAX_CHUNK_SAMPLES is read at call time so that tests can shrink it.
        pieces = [self.encode_chunk(chunk) for chunk in audio.chunks(samples, audio.MAX_CHUNK_SAMPLES)]
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(pieces).astype(np.int64, copy=False)
