"""Random-weight checkpoint roots in exactly the release's formats: tiny ones for tests, the
demo and CI; full-size ones (the released shapes) for benchmarks.

``spiritlm-edge make-tiny-checkpoints DIR --variant base|expressive`` writes a complete
tiny checkpoint root (spec section 1) with small dimensions. Every file has the release's
format and key names, so the loaders under test are the ones a user with the real
checkpoints runs. The writers themselves are ``export/random_speech.py`` and
``export/random_lm.py``; this module decides which ones a variant needs and gives each
component its own seed, so adding a component never changes another's weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant
from spiritlm_edge.export.random_lm import write_random_lm, write_tiny_lm
from spiritlm_edge.export.random_speech import write_hubert, write_pitch, write_style, write_vocoder

log = logging.getLogger(__name__)


def _write_components(steps: list[tuple[str, Callable[[int], object]]], seed: int, what: str) -> None:
    for offset, (name, write) in enumerate(steps):
        start = time.perf_counter()
        write(seed * 1000 + offset)  # one seed per component
        log.info("%s %s written in %.1f s", what, name, time.perf_counter() - start)


def make_tiny_checkpoints(root: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny checkpoint root for ``variant`` under ``root``; returns ``root``."""
    check_variant(variant)
    paths = CheckpointPaths(Path(root))
    steps: list[tuple[str, Callable[[int], object]]] = [("hubert", lambda s: write_hubert(paths, variant, s))]
    if variant == "expressive":
        steps += [
            ("pitch", lambda s: write_pitch(paths, variant, s)),
            ("style", lambda s: write_style(paths, variant, s)),
        ]
    steps += [
        ("vocoder", lambda s: write_vocoder(paths, variant, s)),
        ("lm", lambda s: write_tiny_lm(paths, variant, s)),
    ]
    _write_components(steps, seed, "tiny")
    return paths.root


def write_full_size_checkpoints(
    root: str | os.PathLike,
    variant: str,
    seed: int,
    lm_cfg: dict,
    text_vocab: int,
    lm_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """A checkpoint root with every component of ``variant`` at the release's size, random;
    the LM has the shapes of ``lm_cfg`` and a ``text_vocab``-piece text vocabulary."""
    check_variant(variant)
    paths = CheckpointPaths(Path(root))
    steps: list[tuple[str, Callable[[int], object]]] = [
        ("HuBERT base 25 Hz + quantizer", lambda s: write_hubert(paths, variant, s, size="full"))
    ]
    if variant == "expressive":
        steps += [
            ("pitch VQ-VAE", lambda s: write_pitch(paths, variant, s, size="full")),
            ("wav2vec2-base style encoder", lambda s: write_style(paths, variant, s, size="full")),
        ]
    steps += [
        ("unit HiFi-GAN", lambda s: write_vocoder(paths, variant, s, size="full")),
        ("Llama-2 7B LM", lambda s: write_random_lm(paths, variant, s, lm_cfg, text_vocab, lm_progress)),
    ]
    _write_components(steps, seed, "random")
    return paths.root
