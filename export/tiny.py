"""Tiny random-weight checkpoints in exactly the release's formats.

``spiritlm-edge make-tiny-checkpoints DIR --variant base|expressive`` writes a complete
checkpoint root (spec section 1) with small dimensions, for tests, the demo and CI. Every
file has the release's format and key names, so the loaders under test are the ones a
user with the real checkpoints runs. Each component module owns its ``write_tiny``; this
module only decides which ones a variant needs and gives each its own seed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant

log = logging.getLogger(__name__)


def make_tiny_checkpoints(root: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny checkpoint root for ``variant`` under ``root``; returns ``root``."""
    from spiritlm_edge.export import hubert, lm, style, vocoder, pitch

    check_variant(variant)
    paths = CheckpointPaths(Path(root))
    writers = [("hubert", hubert.write_tiny)]
    if variant == "expressive":
        writers += [("pitch", pitch.write_tiny), ("style", style.write_tiny)]
    writers += [("vocoder", vocoder.write_tiny), ("lm", lm.write_tiny)]
    for offset, (name, write) in enumerate(writers):
        start = time.perf_counter()
        # One seed per component: adding a component never changes another's weights.
        write(paths, variant=variant, seed=seed * 1000 + offset)
        log.info("tiny %s written in %.1f s", name, time.perf_counter() - start)
    return paths.root
