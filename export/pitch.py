"""Pitch tokenizer of Spirit LM Expressive: FCPE F0 -> pitch VQ-VAE -> 12.5 Hz codes.

Release files (spec sections 1 and 4)::

    speech_tokenizer/vqvae_f0_quantizer/config.yaml   # OmegaConf yaml: features, encoder_params,
                                                      # vq_params, decoder_params, ...
    speech_tokenizer/vqvae_f0_quantizer/model.pt      # {"model": state_dict, ...}

The state dict has ``encoder.level_blocks.L.model.*`` (strided Conv1d + dilated residual
stacks, then a width -> emb conv), ``vq.level_blocks.L.k`` (codebook, 64 rows) and
``decoder.*`` (only used in training; loaded strictly into an unused decoder so that a
wrong file is still caught). F0 comes from FCPE (:mod:`spiritlm_edge.export.fcpe`).

Pipeline per audio chunk of at most 100 s (the reference's chunking):
F0 every 80 samples (``N//80 + 1`` frames): FCPE at its own 160-sample hop, frames with
confidence <= 0.05 or F0 < 50 Hz are unvoiced, unvoiced F0 is linearly interpolated,
clamped to 1100 Hz, then nearest-resized to ``N//80 + 1`` frames; ``vuv = 1 - uv``. With a
``norm_`` feature set, the mean F0 of voiced frames is subtracted from non-zero F0.
``(f0, vuv)`` as ``[1, 2, T]`` -> encoder level 0 -> nearest codebook row -> one code per
16 frames (``T // 16``: the strided convolutions floor, nothing is padded).

Exports ``fcpe.onnx`` (audio -> F0 and confidence at FCPE's hop) and ``pitch_vqvae.onnx``
(features -> codes); the steps between them run in NumPy in :mod:`runtime.pitch`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    get_key,
    load_state_dict_strictly,
    load_torch_file,
    require_file,
)
from spiritlm_edge.export.fcpe import FCPE, find_fcpe_weights, load_fcpe
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, chunks, load_audio
from spiritlm_edge.runtime.bundle import add_component, sha256_file
from spiritlm_edge.runtime.errors import CheckpointError
from spiritlm_edge.runtime.pitch import middle_code, neutral_f0_hz, neutral_features

log = logging.getLogger(__name__)

# The reference's FCPE call (spiritlm/speech_tokenizer/f0): 16 kHz, F0 every 80 samples.
F0_HOP = 80
VOICING_THRESHOLD = 0.05
F0_MIN = 50.0
F0_MAX = 1100.0
INTERPOLATE_UNVOICED = True
CODEBOOK_SIZE = 64  # [Pi0] .. [Pi63]
FEATURE_SETS = ("f0_interp,vuv", "f0,vuv", "norm_f0_interp,vuv", "norm_f0,vuv")

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
FCPE_ONNX = "fcpe.onnx"
VQVAE_ONNX = "pitch_vqvae.onnx"

_LEVEL_KEYS = {"input_emb_width", "output_emb_width", "levels", "downs_t", "strides_t"}
_BLOCK_KEYS = {
    "width",
    "depth",
    "m_conv",
    "dilation_growth_rate",
    "dilation_cycle",
    "zero_out",
    "res_scale",
    "reverse_decoder_dilation",
    "checkpoint_res",
}
_VQ_KEYS = {"l_bins", "emb_width", "mu", "levels"}


# -- VQ-VAE -------------------------------------------------------------------------------
# Module names follow the release's state dict (jukebox-style VQ-VAE).


class ResidualUnit(nn.Module):
    """x + scale * conv1x1(relu(dilated conv3(relu(x))))."""

    def __init__(self, channels: int, hidden: int, dilation: int, scale: float):
        super().__init__()
        # Indices 1 and 3 of the reference's Sequential(ReLU, Conv, ReLU, Conv).
        self.model = nn.ModuleDict(
            {
                "1": nn.Conv1d(channels, hidden, 3, 1, dilation, dilation),
                "3": nn.Conv1d(hidden, channels, 1, 1, 0),
            }
        )
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model["3"](F.relu(self.model["1"](F.relu(x))))
        return x + h if self.scale == 1.0 else x + self.scale * h


class DilatedStack(nn.Module):
    def __init__(self, channels: int, p: dict, reverse: bool = False):
        super().__init__()
        depth, cycle = int(p["depth"]), p.get("dilation_cycle")
        growth = int(p.get("dilation_growth_rate", 1))
        dilations = [growth ** (d if cycle is None else d % int(cycle)) for d in range(depth)]
        if reverse:
            dilations = dilations[::-1]
        scale = 1.0 / math.sqrt(depth) if p.get("res_scale") else 1.0
        hidden = int(float(p.get("m_conv", 1.0)) * channels)
        self.model = nn.Sequential(*[ResidualUnit(channels, hidden, d, scale) for d in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _downsampling_steps(down_t: Any, stride_t: Any) -> tuple[list[tuple[int, int, int]], bool]:
    """(stride, kernel, padding) of every strided conv of one level, and whether the level
    uses the list form (whose kernels differ for odd strides and which always ends with
    the width -> emb conv)."""
    if isinstance(stride_t, (list, tuple)):
        steps = []
        for s, d in zip(stride_t, down_t, strict=False):
            s, d = int(s), int(d)
            kernel, pad = (s * 2, s // 2) if s % 2 == 0 else (s * 2 + 1, s // 2 + 1)
            steps += [(s, kernel, pad)] * d
        return steps, True
    s = int(stride_t)
    return [(s, s * 2, s // 2)] * int(down_t), False


def frames_per_code(params: dict) -> int:
    """Input frames per code of level 0."""
    down_t, stride_t = params["downs_t"][0], params["strides_t"][0]
    steps, _ = _downsampling_steps(down_t, stride_t)
    return int(np.prod([s for s, _, _ in steps])) if steps else 1


class EncoderLevel(nn.Module):
    def __init__(self, n_in: int, n_out: int, down_t: Any, stride_t: Any, p: dict):
        super().__init__()
        steps, list_form = _downsampling_steps(down_t, stride_t)
        width = int(p["width"])
        blocks: list[nn.Module] = []
        for i, (s, kernel, pad) in enumerate(steps):
            conv = nn.Conv1d(n_in if i == 0 else width, width, kernel, s, pad)
            blocks.append(nn.Sequential(conv, DilatedStack(width, p)))
        if steps or list_form:
            blocks.append(nn.Conv1d(width, n_out, 3, 1, 1))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DecoderLevel(nn.Module):
    def __init__(self, n_in: int, n_out: int, down_t: Any, stride_t: Any, p: dict):
        super().__init__()
        width, reverse = int(p["width"]), bool(p.get("reverse_decoder_dilation", False))
        blocks: list[nn.Module] = []
        if isinstance(stride_t, (list, tuple)):
            stages = [(int(s), int(d)) for s, d in zip(stride_t, down_t, strict=False)]
            blocks.append(nn.Conv1d(n_out, width, 3, 1, 1))
            for k, (s, d) in enumerate(stages):
                kernel, pad = (s * 2, s // 2) if s % 2 == 0 else (s * 2 + 1, s // 2 + 1)
                last_stage = k == len(stages) - 1
                for i in range(d):
                    out = n_in if (i == d - 1 and last_stage) else width
                    up = nn.ConvTranspose1d(width, out, kernel, s, pad)
                    blocks.append(nn.Sequential(DilatedStack(width, p, reverse), up))
        elif int(down_t) > 0:
            s, d = int(stride_t), int(down_t)
            blocks.append(nn.Conv1d(n_out, width, 3, 1, 1))
            for i in range(d):
                out = n_in if i == d - 1 else width
                up = nn.ConvTranspose1d(width, out, s * 2, s, s // 2)
                blocks.append(nn.Sequential(DilatedStack(width, p, reverse), up))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VQEncoder(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        emb_in, emb_out = int(p["input_emb_width"]), int(p["output_emb_width"])
        self.level_blocks = nn.ModuleList(
            [
                EncoderLevel(emb_in if level == 0 else emb_out, emb_out, down_t, stride_t, p)
                for level, down_t, stride_t in zip(range(int(p["levels"])), p["downs_t"], p["strides_t"], strict=False)
            ]
        )


class VQDecoder(nn.Module):
    """The training-time decoder: loaded so the whole file is checked, never exported."""

    def __init__(self, p: dict):
        super().__init__()
        emb_in, emb_out = int(p["input_emb_width"]), int(p["output_emb_width"])
        self.level_blocks = nn.ModuleList(
            [
                DecoderLevel(emb_out, emb_out, down_t, stride_t, p)
                for _, down_t, stride_t in zip(range(int(p["levels"])), p["downs_t"], p["strides_t"], strict=False)
            ]
        )
        self.out = nn.Conv1d(emb_out, emb_in, 3, 1, 1)


class Codebook(nn.Module):
    k: torch.Tensor  # the codebook rows, a buffer (state-dict key "k", as in the release)

    def __init__(self, l_bins: int, emb_width: int):
        super().__init__()
        self.register_buffer("k", torch.zeros(l_bins, emb_width))


class VQBottleneck(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        levels = range(int(p["levels"]))
        self.level_blocks = nn.ModuleList([Codebook(int(p["l_bins"]), int(p["emb_width"])) for _ in levels])


class PitchVQVAE(nn.Module):
    """Features [B, 2, T] (f0, vuv) -> level-0 codes [B, T // frames_per_code]."""

    def __init__(self, config: dict):
        super().__init__()
        self.encoder = VQEncoder(config["encoder_params"])
        self.vq = VQBottleneck(config["vq_params"])
        self.decoder = VQDecoder(config["decoder_params"])
        # The reference sums the two halves of a latent twice the codebook's width.
        self.sum_halves = int(config["encoder_params"]["output_emb_width"]) == 2 * int(config["vq_params"]["emb_width"])

    @property
    def codebook(self) -> torch.Tensor:
        """The level-0 codebook [bins, emb]."""
        level = self.vq.level_blocks[0]
        assert isinstance(level, Codebook)
        return level.k

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Level-0 latents [B, T', emb] as the codebook sees them."""
        z = self.encoder.level_blocks[0](features).transpose(1, 2)
        if self.sum_halves:
            width = self.codebook.shape[1]
            z = z[..., :width] + z[..., width:]
        return z

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.encode(features)
        k = self.codebook
        # Squared distances, written as the reference writes them (same rounding on ties).
        distance = (z * z).sum(-1, keepdim=True) - 2.0 * torch.matmul(z, k.t()) + (k * k).sum(-1)
        return torch.argmin(distance, dim=-1)


# -- config -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _resolve(value: Any, root: dict, path: Path, depth: int = 0) -> Any:
    """OmegaConf's ``${a.b}`` references (the only OmegaConf feature a saved config uses
    besides plain YAML); custom resolvers (``${oc.env:X}``) are refused."""
    if isinstance(value, dict):
        return {k: _resolve(v, root, path, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, path, depth) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > 8:
        raise CheckpointError(f"Pitch VQ-VAE config {path}: interpolation {value!r} is circular.")

    def lookup(key: str) -> Any:
        if ":" in key:
            raise CheckpointError(
                f"Pitch VQ-VAE config {path} uses the OmegaConf resolver ${{{key}}}; replace it by its value."
            )
        node: Any = root
        for part in key.strip().split("."):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"Pitch VQ-VAE config {path}: ${{{key}}} refers to a missing key.")
            node = node[part]
        return _resolve(node, root, path, depth + 1)

    whole = _INTERPOLATION.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return _INTERPOLATION.sub(lambda m: str(lookup(m.group(1))), value)


def _check_params(block: Any, name: str, allowed: set, required: set, path: Path) -> dict:
    if not isinstance(block, dict):
        raise CheckpointError(f"Pitch VQ-VAE config {path}: {name} must be a mapping, found {type(block).__name__}.")
    missing = sorted(required - set(block))
    unknown = sorted(set(block) - allowed)
    if missing or unknown:
        raise CheckpointError(
            f"Pitch VQ-VAE config {path}: {name} "
            + (f"lacks {', '.join(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"has unknown keys {', '.join(unknown)}" if unknown else "")
            + ". Is this the release's vqvae_f0_quantizer/config.yaml?"
        )
    return block


def read_vqvae_config(path: Path) -> dict:
    """The VQ-VAE's config.yaml, interpolations resolved and checked."""
    require_file(path, "pitch VQ-VAE config")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Pitch VQ-VAE config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"Pitch VQ-VAE config {path} holds a {type(raw).__name__}, expected a mapping.")
    config = _resolve(raw, raw, path)
    what = "Pitch VQ-VAE config"
    features = get_key(config, "features", path, what)
    if features not in FEATURE_SETS:
        raise CheckpointError(f"{what} {path}: features is {features!r}; expected one of {', '.join(FEATURE_SETS)}.")
    level_required = _LEVEL_KEYS | {"width", "depth"}
    for name in ("encoder_params", "decoder_params"):
        p = _check_params(get_key(config, name, path, what), name, _LEVEL_KEYS | _BLOCK_KEYS, level_required, path)
        if p.get("checkpoint_res"):
            raise CheckpointError(f"{what} {path}: {name}.checkpoint_res is set; the release's layout has it off.")
        if int(p["input_emb_width"]) != 2:
            raise CheckpointError(
                f"{what} {path}: {name}.input_emb_width is {p['input_emb_width']}; "
                "the pitch features are (f0, vuv), 2 channels."
            )
    vq = _check_params(get_key(config, "vq_params", path, what), "vq_params", _VQ_KEYS, _VQ_KEYS - {"mu"}, path)
    if int(vq["l_bins"]) != CODEBOOK_SIZE:
        raise CheckpointError(
            f"{what} {path}: vq_params.l_bins is {vq['l_bins']}, but Spirit LM has {CODEBOOK_SIZE} pitch tokens "
            f"([Pi0]..[Pi{CODEBOOK_SIZE - 1}])."
        )
    emb_out, emb = int(config["encoder_params"]["output_emb_width"]), int(vq["emb_width"])
    if emb_out not in (emb, 2 * emb):
        raise CheckpointError(
            f"{what} {path}: encoder output_emb_width {emb_out} does not fit vq_params.emb_width {emb}."
        )
    return config


def normalizes_f0(config: dict) -> bool:
    """The reference subtracts the utterance's mean voiced F0 for ``norm_`` features or
    ``speaker_norm`` (per-speaker stats are unknown at inference: it uses the utterance)."""
    return bool(config.get("speaker_norm", False)) or "norm_" in config["features"]


def load_vqvae(paths: CheckpointPaths) -> tuple[PitchVQVAE, dict]:
    """The pitch VQ-VAE of a checkpoint root, loaded strictly, in eval mode; and its config."""
    config_path, model_path = paths.vqvae_dir / CONFIG_FILE, paths.vqvae_dir / MODEL_FILE
    config = read_vqvae_config(config_path)
    checkpoint = load_torch_file(model_path, "pitch VQ-VAE checkpoint")
    state = get_key(checkpoint, "model", model_path, "pitch VQ-VAE checkpoint")
    model = PitchVQVAE(config)
    load_state_dict_strictly(model, state, model_path, "pitch VQ-VAE checkpoint")
    model.eval()
    return model, config


# -- reference pipeline in PyTorch --------------------------------------------------------


def _interpolate_unvoiced(f0: torch.Tensor, unvoiced: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of unvoiced frames from voiced neighbours, held constant past
    the first/last voiced frame (torchfcpe's interp_uv)."""
    index = torch.arange(f0.shape[0])
    known_x, known_y = index[~unvoiced], f0[~unvoiced]
    query = index[unvoiced]
    right = torch.searchsorted(known_x, query).clamp(max=known_x.shape[0] - 1)
    left = (right - 1).clamp(min=0)
    span = (known_x[right] - known_x[left]).clamp(min=1)
    values = known_y[left] + (query - known_x[left]) * (known_y[right] - known_y[left]) / span
    values = torch.where(query < known_x[0], known_y[0], values)
    values = torch.where(query > known_x[-1], known_y[-1], values)
    out = f0.clone()
    out[unvoiced] = values
    return out


class PitchTokenizer(nn.Module):
    """The whole pitch tokenizer in PyTorch: our parity reference for the ONNX engine."""

    def __init__(self, fcpe: FCPE, vqvae: PitchVQVAE, config: dict):
        super().__init__()
        self.fcpe, self.vqvae = fcpe, vqvae
        self.normalize = normalizes_f0(config)

    @torch.no_grad()
    def f0_vuv(self, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """F0 (Hz, unvoiced interpolated) and vuv per 80-sample frame of one chunk."""
        audio = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))[None]
        f0, confidence = self.fcpe(audio)
        f0 = torch.where(confidence[0] > VOICING_THRESHOLD, f0[0], torch.zeros(()))
        unvoiced = f0 < F0_MIN
        if INTERPOLATE_UNVOICED and bool((~unvoiced).any()):
            f0 = _interpolate_unvoiced(f0, unvoiced)
        elif bool(unvoiced.all()):
            f0 = torch.zeros_like(f0)  # nothing voiced: the reference fails here; we say "no pitch"
        f0 = f0.clamp(max=F0_MAX)
        target = len(chunk) // F0_HOP + 1
        f0 = F.interpolate(f0[None, None], size=target, mode="nearest")[0, 0]
        uv = F.interpolate(unvoiced.float()[None, None], size=target, mode="nearest")[0, 0]
        return f0, 1.0 - uv

    @torch.no_grad()
    def features(self, chunk: np.ndarray) -> torch.Tensor:
        f0, vuv = self.f0_vuv(chunk)
        if self.normalize and bool((vuv != 0).any()):
            f0 = torch.where(f0 != 0, f0 - f0[vuv != 0].mean(), f0)
        return torch.stack([f0, vuv])[None]

    @torch.no_grad()
    def forward(self, audio: np.ndarray) -> np.ndarray:
        """Pitch codes of mono 16 kHz audio, chunk by chunk like the reference."""
        samples = load_audio(audio)
        codes = [self.vqvae(self.features(chunk))[0] for chunk in chunks(samples)]
        return torch.cat(codes).numpy().astype(np.int64)


def load_pitch_tokenizer(paths: CheckpointPaths, fcpe_weights: str | os.PathLike | None = None) -> PitchTokenizer:
    vqvae, config = load_vqvae(paths)
    return PitchTokenizer(load_fcpe(fcpe_weights), vqvae, config).eval()


# -- ONNX ---------------------------------------------------------------------------------


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, inputs: list, outputs: list, dynamic_axes: dict, opset: int
) -> None:
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # Known and harmless here: the TorchScript exporter's deprecation notice, shape
        # checks traced as constants (fixed channel counts), and the reversed-pads Slice
        # that ORT folds itself.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)


def export_onnx(
    paths: CheckpointPaths,
    variant: str,
    bundle_dir: str | os.PathLike,
    opset: int = 17,
    fcpe_weights: str | os.PathLike | None = None,
) -> dict:
    """Write ``fcpe.onnx`` and ``pitch_vqvae.onnx`` into ``bundle_dir`` and record them as
    components ``fcpe`` and ``pitch``; returns the manifest."""
    if variant != "expressive":
        raise CheckpointError(f"Pitch tokens exist only in Spirit LM Expressive, not in {variant!r}.")
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    weights = find_fcpe_weights(fcpe_weights)
    fcpe = load_fcpe(weights)
    vqvae, config = load_vqvae(paths)

    _export(
        fcpe,
        torch.zeros(1, SAMPLE_RATE),
        bundle_dir / FCPE_ONNX,
        ["audio"],
        ["f0", "confidence"],
        {"audio": {0: "batch", 1: "samples"}, "f0": {0: "batch", 1: "frames"}, "confidence": {0: "batch", 1: "frames"}},
        opset,
    )
    step = frames_per_code(config["encoder_params"])
    _export(
        vqvae,
        torch.zeros(1, 2, 8 * step),
        bundle_dir / VQVAE_ONNX,
        ["features"],
        ["codes"],
        {"features": {0: "batch", 2: "frames"}, "codes": {0: "batch", 1: "codes"}},
        opset,
    )

    neutral_code, neutral_f0 = neutral_pitch(PitchTokenizer(fcpe, vqvae, config), step)
    add_component(
        bundle_dir,
        "fcpe",
        {
            "file": FCPE_ONNX,
            "opset": opset,
            "inputs": ["audio"],
            "outputs": ["f0", "confidence"],
            "sample_rate": fcpe.sample_rate,
            "model_hop": fcpe.hop,
            "frame_hop": F0_HOP,
            "threshold": VOICING_THRESHOLD,
            "f0_min": F0_MIN,
            "f0_max": F0_MAX,
            "interpolate_unvoiced": INTERPOLATE_UNVOICED,
            "source": {"file": weights.name, "sha256": sha256_file(weights)},
        },
        variant=variant,
    )
    return add_component(
        bundle_dir,
        "pitch",
        {
            "file": VQVAE_ONNX,
            "opset": opset,
            "inputs": ["features"],
            "outputs": ["codes"],
            "features": config["features"],
            "normalize_f0": normalizes_f0(config),
            "frame_hop": F0_HOP,
            "frames_per_code": step,
            "codebook_size": int(config["vq_params"]["l_bins"]),
            "rate": fcpe.sample_rate / (F0_HOP * step),  # 12.5 Hz for the release
            "neutral_code": neutral_code,
            "neutral_f0_hz": neutral_f0,
        },
        variant=variant,
    )


@torch.no_grad()
def neutral_pitch(tokenizer: PitchTokenizer, step: int) -> tuple[int, float]:
    """(neutral pitch code, its contour's F0 in Hz): the code the PyTorch VQ-VAE gives a flat,
    voiced contour at the speaker-normalised mean (spec section 5). Recorded in bundle.json;
    the runtime computes the same on ONNX for bundles that lack it."""
    f0_hz = 0.0
    if not tokenizer.normalize:
        f0, vuv = tokenizer.f0_vuv(load_audio(BUNDLED_CLIP))
        f0_hz = neutral_f0_hz(False, f0.numpy(), vuv.numpy() != 0)
    codes = tokenizer.vqvae(torch.from_numpy(neutral_features(step, f0_hz)))
    return middle_code(codes.numpy()), f0_hz
