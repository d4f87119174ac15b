"""Where the released checkpoint files live, and strict loading of their tensors.

The layout is the one of the public release (spec section 1)::

    <root>/speech_tokenizer/hubert_25hz/mhubert_base_25hz.pt
    <root>/speech_tokenizer/hubert_25hz/L11_quantizer_500.pt
    <root>/speech_tokenizer/vqvae_f0_quantizer/{config.yaml,model.pt}
    <root>/speech_tokenizer/style_encoder_w2v2/{config.json,pytorch_model.bin}
    <root>/speech_tokenizer/hifigan_spiritlm_base/{config.json,generator.pt,speakers.txt,styles.txt}
    <root>/speech_tokenizer/hifigan_spiritlm_expressive_w2v2/{config.json,generator.pt,speakers.txt}
    <root>/spiritlm_model/spirit-lm-{base,expressive}-7b/{config.json,...,tokenizer.model}

Every component loader in ``export/`` goes through :func:`load_torch_file` and
:func:`load_state_dict_strictly` so that a wrong file always produces the same kind of
error: which file, which key, what shape was expected, what to do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spiritlm_edge.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS_ENV = "SPIRITLM_CHECKPOINTS_DIR"
VARIANTS = ("base", "expressive")


def resolve_checkpoint_root(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint root: ``path`` if given, else ``$SPIRITLM_CHECKPOINTS_DIR``."""
    if path is None:
        path = os.environ.get(CHECKPOINTS_ENV)
        if not path:
            raise CheckpointError(
                "No checkpoint directory given: pass --checkpoints DIR or set "
                f"{CHECKPOINTS_ENV} to the folder that holds speech_tokenizer/ and spiritlm_model/."
            )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {root} does not exist. It should hold speech_tokenizer/ and "
            "spiritlm_model/ as released by Meta (or made by `spiritlm-edge make-tiny-checkpoints`)."
        )
    return root


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise CheckpointError(f"Unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    return variant


@dataclass(frozen=True)
class CheckpointPaths:
    """Paths of every released file under one checkpoint root (they may not exist)."""

    root: Path

    @property
    def speech_tokenizer(self) -> Path:
        return self.root / "speech_tokenizer"

    @property
    def hubert(self) -> Path:
        return self.speech_tokenizer / "hubert_25hz" / "mhubert_base_25hz.pt"

    @property
    def hubert_quantizer(self) -> Path:
        return self.speech_tokenizer / "hubert_25hz" / "L11_quantizer_500.pt"

    @property
    def vqvae_dir(self) -> Path:
        return self.speech_tokenizer / "vqvae_f0_quantizer"

    @property
    def style_encoder_dir(self) -> Path:
        return self.speech_tokenizer / "style_encoder_w2v2"

    def hifigan_dir(self, variant: str) -> Path:
        name = {"base": "hifigan_spiritlm_base", "expressive": "hifigan_spiritlm_expressive_w2v2"}
        return self.speech_tokenizer / name[check_variant(variant)]

    def lm_dir(self, variant: str) -> Path:
        return self.root / "spiritlm_model" / f"spirit-lm-{check_variant(variant)}-7b"


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a :class:`CheckpointError` saying what it should be."""
    if not path.is_file():
        raise CheckpointError(
            f"Missing {what}: {path} does not exist. Check that the checkpoint directory has "
            "the release's layout (see README, 'Checkpoints')."
        )
    return path


def load_torch_file(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load`` a release file, with an error that names the file on failure.

    The release's files hold plain dicts of tensors, numbers and strings, so the safe
    ``weights_only`` loader is used. ``mmap`` maps large files instead of reading them.
    """
    require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for a corrupted or foreign file
        raise CheckpointError(
            f"Cannot read {what} {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            "Expected a PyTorch checkpoint as released; re-download the file."
        ) from None


def load_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc}.") from None


def get_key(mapping: Mapping, key: str, path: Path, what: str) -> Any:
    """``mapping[key]``, or an error naming the file and the missing key."""
    if not isinstance(mapping, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(mapping).__name__}, expected a dict with key {key!r}.")
    if key not in mapping:
        raise CheckpointError(
            f"{what} {path} has no key {key!r} (it has: {', '.join(map(str, list(mapping)[:12]))}). "
            "Is this the right file?"
        )
    return mapping[key]


def shape_mismatches(expected: Mapping[str, tuple], found: Mapping[str, tuple], limit: int = 6) -> list[str]:
    """What differs between two name -> shape tables: missing keys, unexpected keys,
    wrong shapes (the first ``limit`` of each); empty when they match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in expected
        if k in found and tuple(expected[k]) != tuple(found[k])
    ]
    problems = []
    for label, items, sep in (
        ("missing keys", missing, ", "),
        ("unexpected keys", unexpected, ", "),
        ("wrong shapes", wrong, "; "),
    ):
        if items:
            problems.append(f"{label}: {sep.join(items[:limit])}" + (" ..." if len(items) > limit else ""))
    return problems


def load_state_dict_strictly(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, what: str
) -> None:
    """Load every tensor of ``state_dict`` into ``module``; any mismatch is a clear error.

    Strict means: no missing key, no unused key, every shape equal. The error lists the
    first few offending keys with the expected and found shapes.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = shape_mismatches(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise CheckpointError(
            f"{what} {path} does not match its configuration: "
            + " | ".join(problems)
            + ". The file is corrupted or belongs to another model; re-download it."
        )
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
