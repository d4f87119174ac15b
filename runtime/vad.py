"""Voice activity detection for the live loop: Silero VAD on ONNX Runtime, and turn taking.

:class:`SileroVAD` gives the speech probability of each 512-sample block (32 ms at
16 kHz). Silero VAD v5+ is a recurrent model: each call takes the new block with the
last 64 samples of the previous one prepended ("context"), and a ``[2, 1, 128]`` state
that the previous call returned. The model file comes from the ``silero-vad`` pip package
(MIT), which we never import: it declares torch as a dependency, so the edge install gets
it with ``pip install --no-deps silero-vad`` and we only read its ``data/silero_vad.onnx``.
``spiritlm-edge build`` copies that file into bundles as the ``vad`` component.

:class:`TurnDetector` turns the probabilities into turns: speech starts after
``start_ms`` of speech, the turn ends after ``end_silence_ms`` of silence, and the
utterance comes back with ``pad_ms`` of audio before the first and after the last
speech block. ``runtime/turns.py`` builds barge-in on top of it.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.errors import AudioError, BundleError

BLOCK_SAMPLES = 512  # the only window Silero VAD takes at 16 kHz
CONTEXT_SAMPLES = 64  # tail of the previous window, prepended to each new one
STATE_SHAPE = (2, 1, 128)
MODEL_FILE = "silero_vad.onnx"
BUNDLE_COMPONENT = "vad"
BLOCK_MS = BLOCK_SAMPLES * 1000 / SAMPLE_RATE

_INSTALL_HINT = (
    "Install the model with `pip install --no-deps silero-vad` (--no-deps: the package's torch "
    "dependency is not needed), pass --vad-model PATH/silero_vad.onnx, or rebuild the bundle with "
    "`spiritlm-edge build` so that it holds the 'vad' component."
)


def packaged_model_path() -> Path | None:
    """``silero_vad/data/silero_vad.onnx`` of the installed ``silero-vad`` package, found on disk
    without importing the package (importing it imports torch)."""
    spec = importlib.util.find_spec("silero_vad")  # a top-level spec: nothing is executed
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / MODEL_FILE
        if candidate.is_file():
            return candidate
    try:  # an installation whose files are not laid out as a package directory (zip, odd paths)
        dist = importlib.metadata.distribution("silero-vad")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == MODEL_FILE and file.parent.name == "data":
            candidate = Path(str(dist.locate_file(file)))  # typeshed: a SimplePath, at run time a Path
            if candidate.is_file():
                return candidate
    return None


def find_vad_model(model_path: str | os.PathLike | None = None, bundle=None) -> Path:
    """Where the Silero VAD ONNX file is: ``model_path`` if given, else the bundle's ``vad``
    component, else the installed ``silero-vad`` package."""
    if model_path is not None:
        path = Path(model_path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise BundleError(f"VAD model {path} does not exist. {_INSTALL_HINT}")
        return path
    if bundle is not None:
        from spiritlm_edge.runtime.bundle import Bundle

        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle)
        if bundle.has(BUNDLE_COMPONENT):
            return bundle.path(BUNDLE_COMPONENT)
    packaged = packaged_model_path()
    if packaged is None:
        where = f"bundle {bundle.dir} has no 'vad' component and " if bundle is not None else ""
        raise BundleError(f"No Silero VAD model found: {where}the silero-vad package is not installed. {_INSTALL_HINT}")
    return packaged


class SileroVAD:
    """Streaming speech probability of 512-sample blocks at 16 kHz.

    >>> vad = SileroVAD()
    >>> p = vad(block)  # float in [0, 1]; call on consecutive blocks, reset() between streams
    """

    def __init__(self, model_path: str | os.PathLike | None = None, bundle=None, n_threads: int = 1):
        from spiritlm_edge.runtime.onnx_session import create_session

        self.model_path = find_vad_model(model_path, bundle)
        # One thread: the VAD runs next to the LM, and a 32 ms block costs well under a millisecond.
        self.session = create_session(
            self.model_path, providers=["cpu"], n_threads=n_threads
        )  # tiny model: a GPU would only add transfers
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise BundleError(
                f"{self.model_path} is not a Silero VAD v5+ model: its inputs are {sorted(names)}, "
                f"expected ['input', 'sr', 'state']. {_INSTALL_HINT}"
            )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    @classmethod
    def from_bundle(cls, bundle, model_path: str | os.PathLike | None = None) -> SileroVAD:
        return cls(model_path, bundle=bundle)

    def reset(self) -> None:
        """Forget the stream so far (call before an unrelated stream)."""
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._window = np.zeros((1, CONTEXT_SAMPLES + BLOCK_SAMPLES), dtype=np.float32)

    def __call__(self, block: np.ndarray) -> float:
        block = np.asarray(block, dtype=np.float32)
        if block.shape != (BLOCK_SAMPLES,):
            raise AudioError(f"Silero VAD takes blocks of {BLOCK_SAMPLES} samples at 16 kHz; got shape {block.shape}.")
        window = self._window
        window[0, :CONTEXT_SAMPLES] = window[0, -CONTEXT_SAMPLES:]  # previous block's tail
        window[0, CONTEXT_SAMPLES:] = block
        prob, self._state = self.session.run(None, {"input": window, "state": self._state, "sr": self._sr})
        return float(prob[0, 0])

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Probability of each 512-sample block of a whole signal (the last one zero-padded),
        from a fresh state; the VAD is reset afterwards."""
        samples = np.asarray(samples, dtype=np.float32)
        n_blocks = -(-len(samples) // BLOCK_SAMPLES)
        padded = np.zeros(n_blocks * BLOCK_SAMPLES, dtype=np.float32)
        padded[: len(samples)] = samples
        self.reset()
        try:
            return np.array([self(b) for b in padded.reshape(n_blocks, BLOCK_SAMPLES)], dtype=np.float32)
        finally:
            self.reset()


@dataclass
class SpeechStart:
    """Speech has gone on for ``start_ms``: the user is talking (barge-in point)."""


@dataclass
class Utterance:
    """A finished turn: the speech with its padding, and how much of it was speech."""

    audio: np.ndarray
    speech_ms: float
    forced: bool = False  # cut at max_utterance_s rather than ended by silence


@dataclass
class SpeechDiscarded:
    """Speech started but was shorter than ``min_speech_ms`` (a cough, a click)."""

    speech_ms: float


class TurnDetector:
    """End-of-turn logic over per-block speech probabilities.

    States: idle -> (``start_ms`` of blocks at or above ``threshold``) -> speaking ->
    (``end_silence_ms`` of blocks below ``threshold - 0.15``) -> idle. Blocks in between
    the two thresholds keep the current state (hysteresis, as Silero's own iterator does).
    ``feed`` returns :class:`SpeechStart` when speech is confirmed, :class:`Utterance` at
    the end of a turn, :class:`SpeechDiscarded` when the speech was too short, else None.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        start_ms: float = 160.0,
        end_silence_ms: float = 700.0,
        min_speech_ms: float = 250.0,
        pad_ms: float = 300.0,
        max_utterance_s: float = 30.0,
    ):
        if not 0.0 < threshold < 1.0:
            raise AudioError(f"VAD threshold {threshold} must be between 0 and 1 (0.5 suits most microphones).")
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.start_blocks = max(1, round(start_ms / BLOCK_MS))
        self.end_blocks = max(1, round(end_silence_ms / BLOCK_MS))
        self.min_speech_blocks = max(1, round(min_speech_ms / BLOCK_MS))
        self.pad_blocks = max(0, round(pad_ms / BLOCK_MS))
        self.max_blocks = max(self.start_blocks + 1, round(max_utterance_s * 1000 / BLOCK_MS))
        self.reset()

    def reset(self) -> None:
        # Recent blocks while idle: pre-roll plus the unconfirmed speech run.
        self._history: collections.deque = collections.deque(maxlen=self.pad_blocks + self.start_blocks)
        self._run = 0  # consecutive speech blocks while idle
        self._blocks: list[np.ndarray] | None = None  # the utterance while speaking
        self._first_speech = 0  # index in _blocks of the first speech block
        self._last_speech = 0  # index in _blocks of the last speech block
        self._silence = 0  # blocks since the last speech block

    @property
    def speaking(self) -> bool:
        return self._blocks is not None

    @property
    def utterance_blocks(self) -> int:
        """Blocks of the utterance so far (pre-roll included); 0 when idle."""
        return 0 if self._blocks is None else len(self._blocks)

    @property
    def committed_blocks(self) -> int:
        """Blocks of the utterance so far that its audio will surely include (it ends
        ``pad_ms`` after the last speech block, or at the length cap); 0 when idle."""
        if self._blocks is None:
            return 0
        return min(len(self._blocks), self._last_speech + 1 + self.pad_blocks)

    def utterance_audio(self) -> np.ndarray:
        """The utterance so far (pre-roll included); empty when idle."""
        if not self._blocks:
            return np.zeros(0, np.float32)
        return np.concatenate(self._blocks)

    @property
    def speech_ms(self) -> float:
        """Speech so far in the current utterance, first to last speech block; 0 when idle."""
        return 0.0 if self._blocks is None else (self._last_speech + 1 - self._first_speech) * BLOCK_MS

    def feed(self, block: np.ndarray, prob: float) -> SpeechStart | Utterance | SpeechDiscarded | None:
        if self._blocks is None:
            return self._feed_idle(block, prob)
        return self._feed_speaking(self._blocks, block, prob)

    def _feed_idle(self, block: np.ndarray, prob: float) -> SpeechStart | None:
        self._history.append(block)
        self._run = self._run + 1 if prob >= self.threshold else 0
        if self._run < self.start_blocks:
            return None
        self._blocks = list(self._history)
        self._first_speech = len(self._blocks) - self._run
        self._last_speech = len(self._blocks) - 1
        self._silence = 0
        self._history.clear()
        self._run = 0
        return SpeechStart()

    def _feed_speaking(
        self, blocks: list[np.ndarray], block: np.ndarray, prob: float
    ) -> Utterance | SpeechDiscarded | None:
        blocks.append(block)
        if prob >= self.threshold:
            self._last_speech = len(blocks) - 1
            self._silence = 0
        elif prob < self.neg_threshold or self._silence:
            self._silence += 1
        if self._silence >= self.end_blocks:
            return self._finish(blocks, forced=False)
        if len(blocks) >= self.max_blocks:
            return self._finish(blocks, forced=True)
        return None

    def _finish(self, blocks: list[np.ndarray], forced: bool) -> Utterance | SpeechDiscarded:
        first, last = self._first_speech, self._last_speech
        end = len(blocks) if forced else min(len(blocks), last + 1 + self.pad_blocks)
        speech_ms = (last + 1 - first) * BLOCK_MS
        self.reset()
        if speech_ms < self.min_speech_blocks * BLOCK_MS:
            return SpeechDiscarded(speech_ms)
        return Utterance(np.concatenate(blocks[:end]), speech_ms, forced)
