"""Phonetic speech encoder: HuBERT base (25 Hz) + the linear quantizer on layer 11.

Reads the release's files (spec section 4)::

    mhubert_base_25hz.pt   {"model_cfg", "task_cfg", "model_weight", "dictionaries_symbols"}
    L11_quantizer_500.pt   {"model_cfg": {vocab_size, dim, upstream_dim}, "model_weight"}

``model_weight`` uses fairseq's parameter names, so :class:`SpeechEncoder` keeps fairseq's
module layout. The same module also runs the style encoder's wav2vec2 (``export/style.py``
maps the Hugging Face names onto it): both are the wav2vec2-base architecture.

Semantics follow fairseq's ``HubertModel.extract_features(output_layer=11)``:
conv front end (no padding, so ``frames = conv_out_length(samples)``), layer norm,
projection, convolutional positional embedding (weight norm, "same" padding that drops the
last sample for an even kernel), post-LN transformer layers 1..11. fairseq pads the frame
count to a multiple of 2 and masks the pad out of attention; a masked key gets zero
attention weight, so running unpadded gives the same features.
"""

from __future__ import annotations

import ast
import io
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    get_key,
    load_state_dict_strictly,
    load_torch_file,
)
from spiritlm_edge.runtime.bundle import add_component
from spiritlm_edge.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

OUTPUT_LAYER = 11  # the quantizer reads transformer layer 11 (1-based)
HUBERT_WHAT = "HuBERT checkpoint"
QUANTIZER_WHAT = "HuBERT quantizer checkpoint"
ONNX_FILE = "hubert.onnx"

# fairseq HubertConfig defaults for the fields the encoder reads: the reference builds its
# config with these for any key the file lacks (merge_with_parent), so we do too.
FAIRSEQ_DEFAULTS: dict[str, Any] = {
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "extractor_mode": "default",
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "layer_norm_first": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "conv_pos_batch_norm": False,
    "pos_conv_depth": 1,
}
# Pre-training-only tensors of a fairseq HuBERT file: present in the release, unused here
# (the reference drops them too).
UNUSED_HUBERT_KEYS = ("mask_emb", "label_embs_concat", "final_proj.weight", "final_proj.bias")
UNUSED_HUBERT_PREFIXES = ("target_glu.",)

# The 25 Hz model's front end: wav2vec2's 320-sample hop with one more stride-2 layer.
FULL_SIZE_CONV_LAYERS = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 3"
TINY_CONV_LAYERS = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 3"


# ----------------------------------------------------------------------------- config


def parse_conv_layers(spec: str, path: Path | None = None) -> list[tuple[int, int, int]]:
    """``"[(512,10,5)] + [(512,3,2)] * 4"`` -> list of (dim, kernel, stride).

    fairseq ``eval``s this string; we accept only list/tuple literals of integers combined
    with ``+`` and ``*`` so that a checkpoint cannot run code.
    """

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)[:60]}")

    try:
        layers = value(ast.parse(str(spec), mode="eval").body)
        layers = [tuple(int(v) for v in layer) for layer in layers]
        if not layers or any(len(layer) != 3 or min(layer) <= 0 for layer in layers):
            raise ValueError("expected a non-empty list of positive (dim, kernel, stride) triples")
    except (SyntaxError, ValueError, TypeError) as exc:
        where = f" in {path}" if path else ""
        raise CheckpointError(
            f"conv_feature_layers={spec!r}{where} is not a list of (dim, kernel, stride): {exc}."
        ) from None
    return layers


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a wav2vec2-base style encoder (HuBERT and wav2vec2 share them)."""

    conv_layers: tuple[tuple[int, int, int], ...]
    extractor_mode: str = "default"  # "default": group norm on conv 0 only; "layer_norm": every conv
    conv_bias: bool = False
    embed_dim: int = 768
    ffn_dim: int = 3072
    heads: int = 12
    layers: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    eps: float = 1e-5
    project: bool | None = None  # feature projection; None: only when dims differ (fairseq)

    @property
    def hop_samples(self) -> int:
        return int(np.prod([s for _, _, s in self.conv_layers]))

    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def has_projection(self) -> bool:
        return self.conv_dim != self.embed_dim if self.project is None else self.project

    def frames(self, samples: int) -> int:
        """Frames out of the conv front end for ``samples`` input samples (0 if too short)."""
        for _, kernel, stride in self.conv_layers:
            if samples < kernel:
                return 0
            samples = (samples - kernel) // stride + 1
        return samples

    @property
    def min_samples(self) -> int:
        """Fewest samples that give one frame."""
        n = 1
        for _, kernel, stride in reversed(self.conv_layers):
            n = (n - 1) * stride + kernel
        return n

    @classmethod
    def from_fairseq(cls, model_cfg: Mapping, path: Path) -> EncoderConfig:
        cfg = dict(FAIRSEQ_DEFAULTS)
        cfg.update({k: v for k, v in model_cfg.items() if k in FAIRSEQ_DEFAULTS})
        unsupported = {
            "layer_type": ("transformer",),
            "activation_fn": ("gelu",),
            "extractor_mode": ("default", "layer_norm"),
            "layer_norm_first": (False,),
            "conv_pos_batch_norm": (False,),
            "pos_conv_depth": (1,),
        }
        for key, allowed in unsupported.items():
            if cfg[key] not in allowed:
                raise CheckpointError(
                    f"{HUBERT_WHAT} {path}: model_cfg[{key!r}]={cfg[key]!r} is not supported (expected "
                    f"{' or '.join(map(repr, allowed))}, as in HuBERT base). Is this the release's "
                    "mhubert_base_25hz.pt?"
                )
        try:
            config = cls(
                conv_layers=tuple(parse_conv_layers(cfg["conv_feature_layers"], path)),
                extractor_mode=str(cfg["extractor_mode"]),
                conv_bias=bool(cfg["conv_bias"]),
                embed_dim=int(cfg["encoder_embed_dim"]),
                ffn_dim=int(cfg["encoder_ffn_embed_dim"]),
                heads=int(cfg["encoder_attention_heads"]),
                layers=int(cfg["encoder_layers"]),
                conv_pos=int(cfg["conv_pos"]),
                conv_pos_groups=int(cfg["conv_pos_groups"]),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{HUBERT_WHAT} {path}: bad model_cfg value ({exc}).") from None
        config.check(path, HUBERT_WHAT)
        return config

    def check(self, path: Path, what: str) -> None:
        if self.embed_dim % self.heads:
            raise CheckpointError(f"{what} {path}: embed dim {self.embed_dim} is not a multiple of {self.heads} heads.")
        if self.embed_dim % self.conv_pos_groups:
            raise CheckpointError(
                f"{what} {path}: embed dim {self.embed_dim} is not a multiple of {self.conv_pos_groups} "
                "positional-conv groups."
            )


# ----------------------------------------------------------------------------- modules


class _TransposeLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight norm over dim 2 (``weight_g``/``weight_v``, as fairseq saves it)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel * channels)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        y = F.conv1d(x, self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:  # fairseq's SamePad
            y = y[:, :, :-1]
        return y


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        b, t, d = x.shape
        h = self.heads
        q = self.q_proj(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k_proj(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (fairseq ``layer_norm_first=False``)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d = config.embed_dim
        self.self_attn = SelfAttention(d, config.heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.eps)
        self.fc1, self.fc2 = nn.Linear(d, config.ffn_dim), nn.Linear(config.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.pos_conv = nn.Sequential(WeightNormConv1d(config.embed_dim, config.conv_pos, config.conv_pos_groups))
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, n_layers: int) -> torch.Tensor:
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.layer_norm(x)
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x


def _conv_block(config: EncoderConfig, index: int, c_in: int, dim: int, kernel: int, stride: int) -> nn.Sequential:
    # Index 1 is fairseq's Dropout: kept as Identity so parameter names match (N.0 conv, N.2 norm).
    conv = nn.Conv1d(c_in, dim, kernel, stride=stride, bias=config.conv_bias)
    nn.init.kaiming_normal_(conv.weight)
    if config.extractor_mode == "layer_norm":
        norm = nn.Sequential(_TransposeLast(), nn.LayerNorm(dim, eps=config.eps), _TransposeLast())
        return nn.Sequential(conv, nn.Identity(), norm, nn.GELU())
    if index == 0:
        return nn.Sequential(conv, nn.Identity(), nn.GroupNorm(dim, dim, eps=config.eps), nn.GELU())
    return nn.Sequential(conv, nn.Identity(), nn.GELU())


class ConvFeatureExtractor(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        blocks, c_in = [], 1
        for i, (dim, kernel, stride) in enumerate(config.conv_layers):
            blocks.append(_conv_block(config, i, c_in, dim, kernel, stride))
            c_in = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, C, T]
        x = audio.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


class SpeechEncoder(nn.Module):
    """wav2vec2-base / HuBERT-base encoder with fairseq parameter names."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = ConvFeatureExtractor(config)
        self.layer_norm = nn.LayerNorm(config.conv_dim, eps=config.eps)
        self.post_extract_proj: nn.Linear | None = (
            nn.Linear(config.conv_dim, config.embed_dim) if config.has_projection else None
        )
        self.encoder = TransformerEncoder(config)

    def forward(self, audio: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Audio [B, N] -> output of transformer layer ``n_layers`` (1-based; all by default), [B, T, D]."""
        x = self.feature_extractor(audio).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x, self.config.layers if n_layers is None else n_layers)


class LinearQuantizer(nn.Module):
    """The release's layer-11 quantizer: MLP -> 501 logits (500 units + CTC blank)."""

    def __init__(self, vocab_size: int, dim: int, upstream_dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        out_dim = vocab_size + 1
        mid = upstream_dim - out_dim
        h1, h2 = dim - mid // 4, dim - mid // 2
        if h1 <= 0 or h2 <= 0:
            raise ValueError(f"hidden sizes {h1}, {h2} are not positive")
        self.encoder = nn.Sequential(
            nn.Linear(dim, h1), nn.LeakyReLU(), nn.Linear(h1, h2), nn.LeakyReLU(), nn.Linear(h2, out_dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)


def fill_blanks(codes: torch.Tensor, blank: int) -> torch.Tensor:
    """Replace each ``blank`` by the nearest non-blank code to its left, wrapping around.

    The reference repeats ``code[blank] = roll(code, 1)[blank]`` until no blank is left:
    leading blanks therefore take the *last* non-blank code of the sequence, and a sequence
    of only blanks stays blank. Written with a cumulative sum and one gather so it exports
    to ONNX without a loop. ``codes``: int64 [T].
    """
    keep = codes != blank
    kept = torch.cat([codes.new_full((1,), blank), codes[keep]])
    position = torch.cumsum(keep.to(torch.int64), 0)  # index into ``kept`` of the code to use
    position = torch.where(position == 0, position[-1:], position)  # wrap: last kept code
    return kept[position]


# ----------------------------------------------------------------------------- loading


@dataclass
class HubertCheckpoint:
    encoder: SpeechEncoder
    normalize: bool
    sample_rate: int


def _drop_unused(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    used = {}
    for key, tensor in state.items():
        if key in UNUSED_HUBERT_KEYS or key.startswith(UNUSED_HUBERT_PREFIXES):
            continue
        used[key] = tensor
    return used


def load_hubert(paths: CheckpointPaths) -> HubertCheckpoint:
    """The release's ``mhubert_base_25hz.pt`` as a :class:`SpeechEncoder` (eval mode)."""
    path = paths.hubert
    checkpoint = load_torch_file(path, HUBERT_WHAT)
    model_cfg = get_key(checkpoint, "model_cfg", path, HUBERT_WHAT)
    task_cfg = get_key(checkpoint, "task_cfg", path, HUBERT_WHAT)
    state = get_key(checkpoint, "model_weight", path, HUBERT_WHAT)
    get_key(checkpoint, "dictionaries_symbols", path, HUBERT_WHAT)  # part of the format; unused
    for name, value in (("model_cfg", model_cfg), ("task_cfg", task_cfg), ("model_weight", state)):
        if not isinstance(value, Mapping):
            raise CheckpointError(f"{HUBERT_WHAT} {path}: {name} is a {type(value).__name__}, expected a dict.")
    config = EncoderConfig.from_fairseq(model_cfg, path)
    sample_rate = int(task_cfg.get("sample_rate", 16000))
    if sample_rate != 16000:
        raise CheckpointError(f"{HUBERT_WHAT} {path}: task_cfg sample_rate is {sample_rate}, expected 16000.")
    encoder = SpeechEncoder(config)
    load_state_dict_strictly(encoder, _drop_unused(state), path, HUBERT_WHAT)
    encoder.eval()
    return HubertCheckpoint(encoder, bool(task_cfg.get("normalize", False)), sample_rate)


def load_quantizer(paths: CheckpointPaths) -> LinearQuantizer:
    """The release's ``L11_quantizer_500.pt`` as a :class:`LinearQuantizer` (eval mode)."""
    path = paths.hubert_quantizer
    checkpoint = load_torch_file(path, QUANTIZER_WHAT)
    model_cfg = get_key(checkpoint, "model_cfg", path, QUANTIZER_WHAT)
    state = get_key(checkpoint, "model_weight", path, QUANTIZER_WHAT)
    try:
        sizes = {
            k: int(get_key(model_cfg, k, path, f"{QUANTIZER_WHAT} model_cfg of"))
            for k in ("vocab_size", "dim", "upstream_dim")
        }
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{QUANTIZER_WHAT} {path}: bad model_cfg value ({exc}).") from None
    if sizes["vocab_size"] != 500:
        raise CheckpointError(
            f"{QUANTIZER_WHAT} {path}: vocab_size is {sizes['vocab_size']}, but Spirit LM's vocabulary has "
            "500 HuBERT units. Is this L11_quantizer_500.pt?"
        )
    try:
        quantizer = LinearQuantizer(**sizes)
    except ValueError as exc:
        raise CheckpointError(f"{QUANTIZER_WHAT} {path}: model_cfg {sizes} gives {exc}.") from None
    load_state_dict_strictly(quantizer.encoder, state, path, QUANTIZER_WHAT)
    quantizer.eval()
    return quantizer


def check_pair(hubert: HubertCheckpoint, quantizer: LinearQuantizer, paths: CheckpointPaths) -> None:
    dim = quantizer.encoder[0].in_features
    if dim != hubert.encoder.config.embed_dim:
        raise CheckpointError(
            f"{QUANTIZER_WHAT} {paths.hubert_quantizer} expects {dim}-dim features but {paths.hubert} "
            f"outputs {hubert.encoder.config.embed_dim}; the two files do not belong together."
        )


# ----------------------------------------------------------------------------- reference


def normalize_waveform(audio: torch.Tensor) -> torch.Tensor:
    """``task_cfg.normalize``: layer norm over the whole waveform (no affine, eps 1e-5)."""
    return F.layer_norm(audio, audio.shape[-1:])


@torch.no_grad()
def reference_features(hubert: HubertCheckpoint, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Layer-11 features [T, D] of one chunk, computed like the reference (eager PyTorch)."""
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(1, -1)
    if hubert.normalize:
        x = normalize_waveform(x)
    return hubert.encoder(x, OUTPUT_LAYER)[0]


@torch.no_grad()
def reference_units(hubert: HubertCheckpoint, quantizer: LinearQuantizer, audio: np.ndarray) -> np.ndarray:
    """Units [T] of one chunk (at most 100 s), computed like the reference (eager PyTorch)."""
    codes = quantizer(reference_features(hubert, audio)).argmax(-1)
    return fill_blanks(codes, quantizer.vocab_size).numpy()


# ----------------------------------------------------------------------------- ONNX graph


class _Conv1dAs2d(nn.Module):
    """A Conv1d exported as a 1 x k Conv2d on [B, C, 1, T] (same weights, same sums).

    ONNX Runtime's CPU provider runs 2-D convolutions in its blocked NCHWc kernels and 1-D ones
    through im2col + GEMM: on the full-size front end (strided 512-channel convs over up to
    29k frames) and the grouped positional conv, the 2-D form took ~10% off HuBERT's whole
    time on an AMD Zen 4 (`python -m spiritlm_edge.bench.encoder`), with the same units."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach()[:, :, None, :].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride = (1, int(conv.stride[0]))
        self.padding = (0, int(cast(tuple, conv.padding)[0]))
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C', T']
        y = F.conv2d(x[:, :, None, :], self.weight, self.bias, self.stride, self.padding, groups=self.groups)
        return y[:, :, 0, :]


def _as_2d(block: nn.Module) -> nn.Module:
    """A front-end block (conv, dropout, [norm], GELU) whose conv runs as a Conv2d."""
    modules = list(cast(nn.Sequential, block))
    return nn.Sequential(_Conv1dAs2d(cast(nn.Conv1d, modules[0])), *modules[1:])


class _FrontEnd(nn.Module):
    """Export form of the conv front end: audio [1, N] -> features [T, C].

    The first conv (1 input channel, 10 taps, stride 5, then group norm with one group per
    channel) is one GEMM on audio patches: the group norm's per-channel mean and variance
    over time follow exactly from the mean and the k x k covariance of the patches
    (mean = mean(p) W, var = diag(W^T Cov(p) W)), so normalisation and affine fold into
    that GEMM's weight and bias. This removes the InstanceNormalization and its affine
    passes over the largest tensor of the model (measured ~10% of the whole graph on CPU).
    The other convs stay ORT Convs, exported as 2-D convs (:class:`_Conv1dAs2d`) so that ORT
    runs its blocked NCHWc kernels, which beat im2col + MatMul here (measured).
    """

    def __init__(self, extractor: ConvFeatureExtractor, config: EncoderConfig, conv_dims: int = 2):
        super().__init__()
        self.kernel, self.stride = config.conv_layers[0][1:]
        # Typed views of what _conv_block built (a ModuleList does not know its element types).
        first = cast(nn.Sequential, extractor.conv_layers[0])
        conv = cast(nn.Conv1d, first[0])
        # [C_out, 1, k] -> [k, C_out]
        self.weight = nn.Parameter(conv.weight.detach()[:, 0, :].t().contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        # GroupNorm (extractor_mode "default"), or LayerNorm between transposes ("layer_norm")
        self.first_norm = cast(nn.GroupNorm | nn.Sequential, first[2]) if len(first) == 4 else None
        blocks = extractor.conv_layers[1:]
        self.convs = nn.ModuleList(_as_2d(block) if conv_dims == 2 else block for block in blocks)

    def patches(self, audio: torch.Tensor) -> torch.Tensor:
        """[1, N] -> [T, k]: row t = audio[t * stride : t * stride + k]."""
        k, s = self.kernel, self.stride
        x = audio.reshape(-1)
        t_out = (x.shape[0] - k) // s + 1
        if k % s == 0:  # rows of ``stride`` samples side by side: no strided gather
            rows = x[: (t_out + k // s - 1) * s].reshape(-1, s)
            return torch.cat([rows[j : j + t_out] for j in range(k // s)], 1)
        return torch.stack([x[j : j + s * (t_out - 1) + 1 : s] for j in range(k)], 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        cols = self.patches(audio)  # [T, k]
        weight, norm = self.weight, self.first_norm
        if isinstance(norm, nn.GroupNorm):
            centred = cols - cols.mean(0, keepdim=True)  # conv bias cancels in the norm
            cov = torch.matmul(centred.transpose(0, 1), centred) / cols.shape[0]
            var = (torch.matmul(cov, weight) * weight).sum(0)
            scale = norm.weight / torch.sqrt(var + norm.eps)
            x = torch.matmul((weight * scale).transpose(0, 1), centred.transpose(0, 1)) + norm.bias[:, None]
        else:
            x = torch.matmul(weight.transpose(0, 1), cols.transpose(0, 1))  # [C, T]
            if self.bias is not None:
                x = x + self.bias[:, None]
            if norm is not None:  # extractor_mode "layer_norm": over channels
                x = norm[1](x.transpose(0, 1)).transpose(0, 1)
        x = F.gelu(x)[None]  # [1, C, T]
        for block in self.convs:
            x = block(x)
        return x[0].transpose(0, 1)


class _Attention2d(nn.Module):
    """Self-attention on [T, D] (batch 1); the 1/sqrt(d) scale is folded into q_proj."""

    def __init__(self, attn: SelfAttention):
        super().__init__()
        self.heads = attn.heads
        d = attn.q_proj.in_features
        scale = (d // self.heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.q_proj.weight.data.copy_(attn.q_proj.weight.detach() * scale)
        self.q_proj.bias.data.copy_(attn.q_proj.bias.detach() * scale)
        self.k_proj, self.v_proj, self.out_proj = attn.k_proj, attn.v_proj, attn.out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        h = self.heads
        q = self.q_proj(x).reshape(t, h, d // h).transpose(0, 1)  # [H, T, d]
        k = self.k_proj(x).reshape(t, h, d // h).permute(1, 2, 0)  # [H, d, T]
        v = self.v_proj(x).reshape(t, h, d // h).transpose(0, 1)
        weights = torch.softmax(torch.matmul(q, k), dim=-1)
        return self.out_proj(torch.matmul(weights, v).transpose(0, 1).reshape(t, d))


class _Layer2d(nn.Module):
    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.self_attn = _Attention2d(layer.self_attn)
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        self.fc1, self.fc2 = layer.fc1, layer.fc2
        self.final_layer_norm = layer.final_layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class EncoderGraph(nn.Module):
    """Export form of :class:`SpeechEncoder`: batch 1, time-major [T, D], weight norm folded,
    QKV fused, only the layers that are read. Audio [1, N] -> features [T, D]."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        n_layers: int,
        normalize: str | None = None,
        frontend: str = "fused",
        conv_dims: int = 2,
    ):
        super().__init__()
        config = encoder.config
        self.normalize = normalize  # None, "layer_norm" (fairseq), "zero_mean_unit_var" (HF)
        # "fused": see _FrontEnd; "conv": the module as is (kept to measure against)
        # conv_dims 2: the convs as 1 x k Conv2d (_Conv1dAs2d); 1: as Conv1d (kept to compare against)
        self.frontend = (
            _FrontEnd(encoder.feature_extractor, config, conv_dims)
            if frontend == "fused"
            else encoder.feature_extractor
        )
        self.frontend_kind = frontend
        self.layer_norm = encoder.layer_norm
        self.post_extract_proj = encoder.post_extract_proj
        pos = cast(WeightNormConv1d, encoder.encoder.pos_conv[0])  # the Sequential holds only it
        pos_conv = nn.Conv1d(config.embed_dim, config.embed_dim, pos.kernel, padding=pos.kernel // 2, groups=pos.groups)
        pos_conv.load_state_dict({"weight": pos.weight().detach(), "bias": pos.bias.detach()})
        self.pos_conv: nn.Module = _Conv1dAs2d(pos_conv) if conv_dims == 2 else pos_conv
        self.pos_trim = pos.kernel % 2 == 0
        self.encoder_layer_norm = encoder.encoder.layer_norm
        self.layers = nn.ModuleList(_Layer2d(cast(EncoderLayer, layer)) for layer in encoder.encoder.layers[:n_layers])

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if self.normalize:  # over the whole chunk; eps as fairseq's F.layer_norm / HF's extractor
            eps = 1e-5 if self.normalize == "layer_norm" else 1e-7
            centred = audio - audio.mean()
            audio = centred / torch.sqrt((centred * centred).mean() + eps)
        if self.frontend_kind == "fused":
            x = self.frontend(audio)
        else:
            x = self.frontend(audio)[0].transpose(0, 1)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        pos = self.pos_conv(x.transpose(0, 1)[None])[0]
        if self.pos_trim:
            pos = pos[:, :-1]
        x = self.encoder_layer_norm(x + F.gelu(pos).transpose(0, 1))
        for layer in self.layers:
            x = layer(x)
        return x


class HubertGraph(nn.Module):
    """Audio [1, N] -> (units int64 [T], layer-11 features [T, D])."""

    def __init__(
        self, hubert: HubertCheckpoint, quantizer: LinearQuantizer, frontend: str = "fused", conv_dims: int = 2
    ):
        super().__init__()
        normalize = "layer_norm" if hubert.normalize else None
        self.encoder = EncoderGraph(hubert.encoder, OUTPUT_LAYER, normalize, frontend, conv_dims)
        self.quantizer = quantizer.encoder
        self.blank = quantizer.vocab_size

    def forward(self, audio: torch.Tensor):
        features = self.encoder(audio)
        codes = self.quantizer(features).argmax(-1)
        return fill_blanks(codes, self.blank), features


def export_graph_onnx(
    graph: nn.Module,
    out_path: Path,
    example: torch.Tensor,
    output_names: list[str],
    dynamic_outputs: dict,
    opset: int = 17,
) -> None:
    """TorchScript-exporter ONNX export with a dynamic sample axis; deterministic bytes."""
    graph.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic are expected
        torch.onnx.export(
            graph,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            opset_version=opset,
            input_names=["audio"],
            output_names=output_names,
            dynamic_axes={"audio": {1: "samples"}, **dynamic_outputs},
            do_constant_folding=True,
        )
    out_path.write_bytes(buffer.getvalue())


def export_onnx(
    paths: CheckpointPaths,
    variant: str,
    bundle_dir: str | Path,
    opset: int = 17,
    frontend: str = "fused",
    conv_dims: int = 2,
) -> dict:
    """Export HuBERT + quantizer + blank filling to ``<bundle>/hubert.onnx`` and register it."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    hubert = load_hubert(paths)
    quantizer = load_quantizer(paths)
    check_pair(hubert, quantizer, paths)
    config = hubert.encoder.config
    graph = HubertGraph(hubert, quantizer, frontend, conv_dims)
    example = torch.zeros(1, 16000)
    export_graph_onnx(
        graph,
        bundle_dir / ONNX_FILE,
        example,
        ["units", "features"],
        {"units": {0: "frames"}, "features": {0: "frames"}},
        opset,
    )
    entry = {
        "file": ONNX_FILE,
        "opset": opset,
        "inputs": {"audio": "float32 [1, samples], mono 16 kHz"},
        "outputs": {"units": "int64 [frames], 0..500", "features": f"float32 [frames, {config.embed_dim}], layer 11"},
        "hop_samples": config.hop_samples,
        "rate_hz": 16000 / config.hop_samples,
        "min_samples": max(1280, config.min_samples),
        "frames_min_samples": config.min_samples,
        "conv_layers": [list(layer) for layer in config.conv_layers],
        "output_layer": OUTPUT_LAYER,
        "vocab_size": quantizer.vocab_size,
        "normalize": hubert.normalize,
    }
    return add_component(bundle_dir, "hubert", entry, variant=variant)
