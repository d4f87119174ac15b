"""The unit HiFi-GAN vocoder of Spirit LM: PyTorch module, release loader, ONNX export.

The release ships one vocoder per variant (spec section 6)::

    speech_tokenizer/hifigan_spiritlm_base/{config.json,generator.pt,speakers.txt,styles.txt}
    speech_tokenizer/hifigan_spiritlm_expressive_w2v2/{config.json,generator.pt,speakers.txt}

``generator.pt`` holds ``{"generator": state_dict}`` with weight-norm parameters
(``weight_g``/``weight_v``; the newer ``parametrizations.weight.original0/1`` names are
accepted too). The model embeds each input stream and concatenates the embeddings on
channels: units (``dict``), pitch codes (``f0_dict``), style codes (``style_dict``), the
speaker (``spkr``) and, for Base, a global style (``style``). An optional duration
predictor (``dur_predictor``) turns deduplicated units back into frame counts. Then a
standard HiFi-GAN generator makes 16 kHz audio, ``prod(upsample_rates)`` samples per frame.

The export writes three graphs with weight norm folded in: ``vocoder_duration.onnx``
(units -> frames per unit), ``vocoder.onnx`` (per-frame inputs -> audio) and
``vocoder_stream.onnx`` (the same generator computed chunk by chunk with explicit state,
see :class:`StreamingGenerator`), so that the runtime expands durations between them and
streams the generator computing each frame once.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    check_variant,
    get_key,
    load_json,
    load_state_dict_strictly,
    load_torch_file,
    require_file,
)
from spiritlm_edge.runtime.bundle import add_component
from spiritlm_edge.runtime.errors import CheckpointError, ModelError, UnitsError

log = logging.getLogger(__name__)

LRELU_SLOPE = 0.1
DEFAULT_SPEAKER = 2
BASE_DEFAULT_STYLE = 8  # "conv-default" in the Base vocoder's styles.txt
SAMPLE_RATE = 16000
ONNX_FILE = "vocoder.onnx"
# "blocked": 2-D convs arranged for ONNX Runtime's x86 NCHWc kernels (see _BlockedGenerator);
# "plain": 1-D convs, for execution providers without NCHWc (ARM CPUs, CUDA, TensorRT).
LAYOUTS = ("blocked", "plain")
DURATION_ONNX_FILE = "vocoder_duration.onnx"
STREAM_ONNX_FILE = "vocoder_stream.onnx"  # the stateful streaming generator (StreamingGenerator)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VocoderConfig:
    """The hyper-parameters of ``config.json`` that shape the network."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    model_in_dim: int
    num_embeddings: int
    embedding_dim: int
    num_f0_tokens: int = 0
    num_style_tokens: int = 0
    code_hop_size: int = 640
    f0_hop_size: int = 0
    style_hop_size: int = 0
    multispkr: bool = False
    num_speakers: int = 200
    multistyle: bool = False
    num_styles: int = 100
    dur_predictor: dict | None = None  # encoder_embed_dim, var_pred_hidden_dim, var_pred_kernel_size
    f0_quant_num_bin: int = 0
    sampling_rate: int = SAMPLE_RATE

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)

    @property
    def pitch_upsample(self) -> int:
        """Unit frames per pitch code (2 for 25 Hz units and 12.5 Hz pitch)."""
        return round(self.f0_hop_size / self.code_hop_size) if self.num_f0_tokens else 0

    @property
    def style_upsample(self) -> int:
        """Unit frames per style code (25 for 25 Hz units and 1 Hz style)."""
        return round(self.style_hop_size / self.code_hop_size) if self.num_style_tokens else 0

    @classmethod
    def from_dict(cls, cfg: dict, path: Path) -> VocoderConfig:
        what = "vocoder config"

        def need(key):
            return get_key(cfg, key, path, what)

        def bad(key, why):
            return CheckpointError(f"{what} {path}: {key!r} {why}. Is this the release's config.json?")

        if cfg.get("f0"):
            raise bad("f0", "is set: continuous-F0 conditioning is not used by Spirit LM and not supported")
        if cfg.get("embedder_params"):
            raise bad("embedder_params", "is set: speaker-embedding input is not used by Spirit LM and not supported")
        rates = tuple(int(u) for u in need("upsample_rates"))
        kernels = tuple(int(k) for k in need("upsample_kernel_sizes"))
        if len(rates) != len(kernels) or not rates:
            raise bad("upsample_kernel_sizes", f"has {len(kernels)} entries but upsample_rates has {len(rates)}")
        rb_kernels = tuple(int(k) for k in need("resblock_kernel_sizes"))
        rb_dilations = tuple(tuple(int(d) for d in ds) for ds in need("resblock_dilation_sizes"))
        if len(rb_kernels) != len(rb_dilations) or any(len(ds) != 3 for ds in rb_dilations):
            raise bad("resblock_dilation_sizes", "must hold 3 dilations per resblock kernel size")
        if str(cfg.get("resblock", "1")) != "1":
            # The reference builds the 3-dilation ResBlock whatever this key says; so do we.
            log.warning("%s: resblock=%r ignored (the reference always uses type 1)", path, cfg["resblock"])
        dur = cfg.get("dur_predictor_params") or None
        if dur is not None:
            dur = {
                k: get_key(dur, k, path, what + " dur_predictor_params")
                for k in ("encoder_embed_dim", "var_pred_hidden_dim", "var_pred_kernel_size")
            }
            if int(dur["var_pred_kernel_size"]) != 3:
                # The second conv of the predictor is padded by 1 whatever its kernel:
                # only kernel 3 keeps one duration per unit.
                raise bad("dur_predictor_params.var_pred_kernel_size", "must be 3")
        config = cls(
            upsample_rates=rates,
            upsample_kernel_sizes=kernels,
            upsample_initial_channel=int(need("upsample_initial_channel")),
            resblock_kernel_sizes=rb_kernels,
            resblock_dilation_sizes=rb_dilations,
            model_in_dim=int(cfg.get("model_in_dim", 80)),
            num_embeddings=int(need("num_embeddings")),
            embedding_dim=int(need("embedding_dim")),
            num_f0_tokens=int(cfg.get("num_f0_tokens") or 0),
            num_style_tokens=int(cfg.get("num_style_tokens") or 0),
            code_hop_size=int(cfg.get("code_hop_size", 640)),
            f0_hop_size=int(cfg.get("f0_hop_size", 0) or 0),
            style_hop_size=int(cfg.get("style_hop_size", 0) or 0),
            multispkr=bool(cfg.get("multispkr")),
            num_speakers=int(cfg.get("num_speakers", 200)),
            multistyle=bool(cfg.get("multistyle")),
            num_styles=int(cfg.get("num_styles", 100)),
            dur_predictor=dur,
            f0_quant_num_bin=int(cfg.get("f0_quant_num_bin", 0) or 0),
            sampling_rate=int(cfg.get("sampling_rate", SAMPLE_RATE)),
        )
        if config.num_f0_tokens and config.pitch_upsample < 1:
            raise bad("f0_hop_size", "must be at least code_hop_size when num_f0_tokens is set")
        if config.num_style_tokens and config.style_upsample < 1:
            raise bad("style_hop_size", "must be at least code_hop_size when num_style_tokens is set")
        streams = 1 + bool(config.num_f0_tokens) + bool(config.num_style_tokens) + config.multispkr + config.multistyle
        if config.model_in_dim != streams * config.embedding_dim:
            raise bad(
                "model_in_dim",
                f"is {config.model_in_dim} but the {streams} embedded inputs of "
                f"size {config.embedding_dim} make {streams * config.embedding_dim}",
            )
        if config.sampling_rate != SAMPLE_RATE:
            raise bad("sampling_rate", f"is {config.sampling_rate}; Spirit LM vocoders make {SAMPLE_RATE} Hz")
        return config

    def to_dict(self) -> dict[str, Any]:
        """``config.json`` in the release's key names."""
        cfg: dict[str, Any] = {
            "resblock": "1",
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "model_in_dim": self.model_in_dim,
            "segment_size": 8960,
            "code_hop_size": self.code_hop_size,
            "sampling_rate": self.sampling_rate,
            "multispkr": "from_input_file" if self.multispkr else None,
            "num_speakers": self.num_speakers,
        }
        if self.num_f0_tokens:
            cfg.update(num_f0_tokens=self.num_f0_tokens, f0_hop_size=self.f0_hop_size)
        if self.num_style_tokens:
            cfg.update(num_style_tokens=self.num_style_tokens, style_hop_size=self.style_hop_size)
        if self.multistyle:
            cfg.update(multistyle="from_input_file", num_styles=self.num_styles)
        if self.dur_predictor:
            cfg["dur_predictor_params"] = dict(self.dur_predictor, var_pred_dropout=0.5)
        return cfg


def model_config(variant: str, size: str = "tiny", num_speakers: int = 4, num_styles: int = 10) -> VocoderConfig:
    """A config in the release's structure: ``size="full"`` is the release's size (about 14 M
    parameters Base, 15 M Expressive: the standard unit HiFi-GAN with 640 samples per frame),
    ``"tiny"`` keeps every part but with a few channels."""
    check_variant(variant)
    expressive = variant == "expressive"
    rb_k: tuple[int, ...]
    if size == "full":
        emb, ch, rb_k, hidden = 128, 512, (3, 7, 11), 128
    elif size == "tiny":
        emb, ch, rb_k, hidden = 8, 64, (3, 7), 8
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    streams = 2 + (2 if expressive else 1)
    return VocoderConfig(
        upsample_rates=(5, 4, 4, 4, 2),
        upsample_kernel_sizes=(11, 8, 8, 8, 4),
        upsample_initial_channel=ch,
        resblock_kernel_sizes=rb_k,
        resblock_dilation_sizes=tuple((1, 3, 5) for _ in rb_k),
        model_in_dim=streams * emb,
        num_embeddings=501,
        embedding_dim=emb,
        num_f0_tokens=64 if expressive else 0,
        num_style_tokens=100 if expressive else 0,
        code_hop_size=640,
        f0_hop_size=1280 if expressive else 0,
        style_hop_size=16000 if expressive else 0,
        multispkr=True,
        num_speakers=num_speakers,
        multistyle=not expressive,
        num_styles=num_styles,
        dur_predictor={"encoder_embed_dim": emb, "var_pred_hidden_dim": hidden, "var_pred_kernel_size": 3},
    )


# --------------------------------------------------------------------------- layers


class WNConv1d(nn.Module):
    """Conv1d whose weight is ``g * v / ||v||`` (weight norm on dim 0), named as in the release."""

    transposed = False

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        shape = (cin, cout, kernel) if self.transposed else (cout, cin, kernel)
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(shape).normal_(0.0, 0.01))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @property
    def weight(self) -> torch.Tensor:
        norm = self.weight_v.flatten(1).norm(dim=1).view(-1, 1, 1)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x):
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def folded(self) -> nn.Module:
        """The plain layer with weight norm folded in (for export)."""
        cout, cin, k = self.weight_v.shape
        conv = nn.Conv1d(cin, cout, k, self.stride, self.padding, self.dilation)
        conv.load_state_dict({"weight": self.weight, "bias": self.bias})
        return conv


class WNConvTranspose1d(WNConv1d):
    transposed = True

    def forward(self, x):
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)

    def folded(self, polyphase: bool = True) -> nn.Module:
        cin, cout, k = self.weight_v.shape
        if polyphase and k - self.stride == 2 * self.padding:
            return PolyphaseUpsample(self.weight.detach(), self.bias.detach(), self.stride, self.padding)
        conv = nn.ConvTranspose1d(cin, cout, k, self.stride, self.padding)
        conv.load_state_dict({"weight": self.weight, "bias": self.bias})
        return conv


class PolyphaseUpsample(nn.Module):
    """A stride-``u`` transposed convolution computed as one ordinary convolution with
    ``u`` times the output channels, interleaved by a reshape.

    Output sample ``n = q*u + r`` of the transposed conv only sees the taps ``j`` with
    ``j = n + p - m*u`` for input ``m``: for each phase ``r`` that is a short ordinary
    convolution over the input. ONNX Runtime runs a plain Conv (im2col + GEMM, no col2im
    scatter) faster than ConvTranspose. Exact for ``k - u == 2p`` (output length ``u*T``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int):
        super().__init__()
        cin, cout, k = weight.shape
        u, p = stride, padding
        # Phase r, tap j = i*u + b reads input m = q + a - i where r + p = a*u + b.
        offsets = {}
        for r in range(u):
            a, b = divmod(r + p, u)
            offsets[r] = [(a - i, i * u + b) for i in range((k - b + u - 1) // u) if i * u + b < k]
        lo = min(o for taps in offsets.values() for o, _ in taps)
        hi = max(o for taps in offsets.values() for o, _ in taps)
        kernel = torch.zeros(cout, u, cin, hi - lo + 1)
        for r, taps in offsets.items():
            for o, j in taps:
                kernel[:, r, :, o - lo] = weight[:, :, j].t()
        self.conv = nn.Conv1d(cin, cout * u, hi - lo + 1, padding=0)
        self.conv.load_state_dict(
            {"weight": kernel.reshape(cout * u, cin, hi - lo + 1), "bias": bias.repeat_interleave(u)}
        )
        self.pad = (-lo, hi)  # conv input index q - pad_left + t reads offset t + lo
        self.cout, self.u = cout, u

    def forward(self, x):
        return self.interleave(self.conv(F.pad(x, self.pad)))

    def interleave(self, y):
        """(B, cout*u, [1,] T) phase outputs -> (B, cout, [1,] T*u) samples."""
        batch, frames, middle = y.shape[0], y.shape[-1], tuple(y.shape[2:-1])
        y = y.reshape(batch, self.cout, self.u, frames).transpose(2, 3)
        return y.reshape((batch, self.cout) + middle + (frames * self.u,))


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    """Three (dilated conv, conv) pairs with pre-activation and residual connections."""

    def __init__(self, channels: int, kernel: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel, 1, _padding(kernel, d), d) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel, 1, _padding(kernel)) for _ in dilations)

    def forward(self, x):
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=False):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class DurationPredictor(nn.Module):
    """conv -> ReLU -> LN -> conv -> ReLU -> LN -> linear: log(1 + frames) per unit."""

    def __init__(self, in_dim: int, hidden: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(in_dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, C, T) -> (B, T)
        x = self.ln1(self.conv1(x).transpose(1, 2)).transpose(1, 2)
        x = self.ln2(self.conv2(x).transpose(1, 2))
        return self.proj(x).squeeze(2)

    def frames(self, x):
        """Frames per unit, as the reference rounds them: ``max(1, round(exp(logd) - 1))``."""
        return torch.clamp(torch.round(torch.exp(self(x)) - 1), min=1).long()


# --------------------------------------------------------------------------- model


class UnitHiFiGAN(nn.Module):
    """Spirit LM's unit HiFi-GAN (state-dict names as in the release's ``generator.pt``)."""

    def __init__(self, config: VocoderConfig):
        super().__init__()
        self.config = c = config
        ch = c.upsample_initial_channel
        self.conv_pre = WNConv1d(c.model_in_dim, ch, 7, 1, 3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, (k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=False))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=False)
        )
        self.conv_post = WNConv1d(ch // 2 ** len(self.ups), 1, 7, 1, 3)
        self.dict = nn.Embedding(c.num_embeddings, c.embedding_dim)
        self.f0_dict = nn.Embedding(c.num_f0_tokens, c.embedding_dim) if c.num_f0_tokens else None
        self.style_dict = nn.Embedding(c.num_style_tokens, c.embedding_dim) if c.num_style_tokens else None
        self.spkr = nn.Embedding(c.num_speakers, c.embedding_dim) if c.multispkr else None
        self.style = nn.Embedding(c.num_styles, c.embedding_dim) if c.multistyle else None
        self.dur_predictor = None
        if c.dur_predictor:
            d = c.dur_predictor
            self.dur_predictor = DurationPredictor(
                int(d["encoder_embed_dim"]), int(d["var_pred_hidden_dim"]), int(d["var_pred_kernel_size"])
            )
        # Unused at inference, but present in checkpoints trained with quantized-F0 input.
        self.f0_quant_embed = nn.Embedding(c.f0_quant_num_bin, c.embedding_dim) if c.f0_quant_num_bin > 0 else None
        self.speakers: list[str] = []
        self.styles: list[str] = []
        self.layout_2d = False
        self.blocked: nn.Module | None = None  # export-only arrangement, see _BlockedGenerator

    # The generator graph: per-frame inputs (durations already applied) -> audio.
    def forward(self, units, pitch=None, style_codes=None, speaker=None, style_id=None):
        """``units``/``pitch``/``style_codes``: (T,) int64 per frame; ``speaker``/``style_id``:
        (1,) int64. Returns (T * hop_length,) float32 audio in [-1, 1]."""
        x = self.features(units, pitch, style_codes, speaker, style_id)
        if self.blocked is not None:
            return self.blocked(x).view(-1)
        return self.generate(x).view(-1)

    def features(self, units, pitch=None, style_codes=None, speaker=None, style_id=None):
        """The generator's input: every stream embedded and concatenated on channels,
        (1, C, T), or (1, C, 1, T) in the 2-D layout. Per frame, so it streams as it is."""
        frames = units.shape[0]
        feats = [self.dict(units)]
        if self.f0_dict is not None:
            feats.append(self.f0_dict(pitch))
        if self.style_dict is not None:
            feats.append(self.style_dict(style_codes))
        if self.spkr is not None:
            feats.append(self.spkr(speaker).expand(frames, -1))
        if self.style is not None:
            feats.append(self.style(style_id).expand(frames, -1))
        x = torch.cat(feats, dim=1).t().unsqueeze(0)
        if self.layout_2d:
            x = x.unsqueeze(2)  # (1, C, 1, T): see fold_weight_norm
        return x

    def generate(self, x):
        kernels = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * kernels : (i + 1) * kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / kernels
        # The reference's last activation uses leaky_relu's default slope (0.01), not 0.1.
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def durations(self, units: torch.Tensor) -> torch.Tensor:
        """Frames per unit from the duration predictor; ``units`` is (T,) int64."""
        if self.dur_predictor is None:
            raise CheckpointError("This vocoder has no duration predictor (no dur_predictor_params in config.json).")
        return self.dur_predictor.frames(self.dict(units).t().unsqueeze(0)).view(-1)

    @torch.no_grad()
    def synthesize(
        self, hubert, pitch=None, style=None, speaker_id=DEFAULT_SPEAKER, style_id=None, dur_pred=True
    ) -> torch.Tensor:
        """The reference's ``SpiritLMTokenizer.decode`` on a units dict, in PyTorch.

        Units are used as given (the reference decodes with ``not_dedup_code=True``). If
        pitch codes are given and their count differs from the units', the input is a
        resynthesis at the streams' own rates: durations are not predicted and pitch/style
        codes are repeated up to the unit rate. Otherwise every stream is per unit and the
        duration predictor (if ``dur_pred``) sets how many frames each unit lasts.
        """
        c = self.config
        units = torch.as_tensor(list(hubert), dtype=torch.long)
        frames = units.shape[0]
        if pitch is not None and c.num_f0_tokens and len(pitch) != frames:
            dur_pred = False
        if dur_pred and self.dur_predictor is None:
            raise ModelError("This vocoder has no duration predictor; decode with dur_pred=False.")
        inputs = {}
        for name, codes, enabled, ratio in (
            ("pitch", pitch, c.num_f0_tokens, c.pitch_upsample),
            ("style_codes", style, c.num_style_tokens, c.style_upsample),
        ):
            if not enabled:
                continue
            if codes is None:
                raise UnitsError(f"This vocoder needs {name} codes.")
            codes = torch.as_tensor(list(codes), dtype=torch.long)
            if not dur_pred and len(codes) != frames:
                codes = upsample_codes(codes, frames, ratio)
            inputs[name] = codes
        if dur_pred:
            reps = self.durations(units)
            units = units.repeat_interleave(reps)
            inputs = {k: v.repeat_interleave(reps) for k, v in inputs.items()}
        if c.multispkr:
            inputs["speaker"] = torch.tensor([speaker_id])
        if c.multistyle:
            inputs["style_id"] = torch.tensor([BASE_DEFAULT_STYLE if style_id is None else style_id])
        return self(units, **inputs)


def upsample_codes(codes: torch.Tensor, frames: int, ratio: int) -> torch.Tensor:
    """Codes at a slower rate repeated ``ratio`` times, padded with the last one or cut to
    ``frames`` (the reference's rule, including its tolerance of one code)."""
    if abs(len(codes) * ratio - frames) / ratio > 1:
        raise UnitsError(
            f"{len(codes)} codes at 1/{ratio} of the unit rate do not match {frames} units "
            f"(expected about {frames / ratio:.0f})."
        )
    up = codes.repeat_interleave(ratio)
    if len(up) < frames:
        up = torch.cat([up, up[-1:].expand(frames - len(up))])
    return up[:frames]


# --------------------------------------------------------------------------- streaming context


def generator_context(config: VocoderConfig) -> tuple[int, int]:
    """(left, right): the input frames that the audio of one frame depends on.

    Walks the network from the output back to its input with exact interval arithmetic:
    output samples ``[0, hop)`` (one frame) need a sample interval at each layer's input;
    a stride-1 conv widens it by its padding (left) and ``span - padding`` (right); a
    transposed conv maps outputs ``[n0, n1]`` to the inputs ``m`` with
    ``n + p - k + 1 <= m*u <= n + p``. The audio of frames ``[a, b)`` is then exactly the
    offline audio when computed from input frames ``[a - left, b + right)``.
    """

    def conv(k, d=1):
        pad = _padding(k, d)
        return pad, (k - 1) * d - pad

    def widen(interval, sides):
        return interval[0] - sides[0], interval[1] + sides[1]

    lo, hi = widen((0, config.hop_length - 1), conv(7))  # conv_post
    levels = list(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=False))
    for u, k in reversed(levels):
        spans = [
            [conv(kernel, d) for d in dils] + [conv(kernel)] * len(dils)
            for kernel, dils in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=False)
        ]
        lo -= max(sum(s[0] for s in block) for block in spans)
        hi += max(sum(s[1] for s in block) for block in spans)
        p = (k - u) // 2
        lo, hi = -((-(lo + p - k + 1)) // u), (hi + p) // u
    lo, hi = widen((lo, hi), conv(7))  # conv_pre, at the frame rate
    return -lo, hi


def duration_context(config: VocoderConfig) -> tuple[int, int]:
    """(left, right) units that one unit's predicted duration depends on."""
    if not config.dur_predictor:
        return 0, 0
    k = int(config.dur_predictor["var_pred_kernel_size"])
    side = (k - 1) // 2 + 1  # conv1 padding + conv2 padding (1)
    return side, side


# --------------------------------------------------------------------------- loading


def _read_lines(path: Path, what: str) -> list[str]:
    require_file(path, what)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not UTF-8 text: {exc}.") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise CheckpointError(f"{what} {path} is empty: it should list one name per line.")
    return lines


def _rename_parametrizations(state: dict) -> dict:
    """Accept checkpoints saved with ``torch.nn.utils.parametrizations.weight_norm``."""
    out = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        out[key] = value
    return out


def load_vocoder(paths: CheckpointPaths, variant: str) -> UnitHiFiGAN:
    """The released vocoder of ``variant``, strictly loaded, in eval mode.

    Sets ``.speakers`` (speakers.txt) and, for Base, ``.styles`` (styles.txt).
    """
    directory = paths.hifigan_dir(variant)
    config_path = directory / "config.json"
    config = VocoderConfig.from_dict(load_json(config_path, "vocoder config"), config_path)
    model = UnitHiFiGAN(config)
    gen_path = directory / "generator.pt"
    checkpoint = load_torch_file(gen_path, "vocoder checkpoint")
    state = get_key(checkpoint, "generator", gen_path, "vocoder checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"vocoder checkpoint {gen_path}: 'generator' holds a {type(state).__name__}, expected a state dict."
        )
    load_state_dict_strictly(model, _rename_parametrizations(state), gen_path, "vocoder checkpoint")
    if config.multispkr:
        model.speakers = _read_lines(directory / "speakers.txt", "vocoder speaker list")
        if len(model.speakers) > config.num_speakers:
            raise CheckpointError(
                f"vocoder speaker list {directory / 'speakers.txt'} names {len(model.speakers)} speakers "
                f"but config.json has num_speakers={config.num_speakers}."
            )
    if config.multistyle:
        model.styles = _read_lines(directory / "styles.txt", "vocoder style list")
        if len(model.styles) > config.num_styles:
            raise CheckpointError(
                f"vocoder style list {directory / 'styles.txt'} names {len(model.styles)} styles "
                f"but config.json has num_styles={config.num_styles}."
            )
    return model.eval()


# --------------------------------------------------------------------------- ONNX export


def _as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    if isinstance(conv.padding, str):  # never for the convs fold_weight_norm makes
        raise ValueError(f"cannot lay out a Conv1d with padding={conv.padding!r} in 2-D; it needs numeric padding")
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (1, conv.kernel_size[0]),
        (1, conv.stride[0]),
        (0, conv.padding[0]),
        (1, conv.dilation[0]),
        bias=conv.bias is not None,
    )
    state = conv.state_dict()
    state["weight"] = state["weight"].unsqueeze(2)
    out.load_state_dict(state)
    return out


def fold_weight_norm(model: UnitHiFiGAN, layout_2d: bool = False, polyphase: bool = True) -> UnitHiFiGAN:
    """A copy with every weight-norm layer replaced by its plain (or polyphase) equivalent.

    ``layout_2d`` runs the generator on (N, C, 1, T) tensors with (1, k) kernels: ONNX
    Runtime's NCHWc (blocked-channel, AVX2/AVX-512) convolution kernels only take 2-D
    convolutions, and they are much faster than its im2col path for 16-64 channels.
    """
    model = copy.deepcopy(model).eval()

    def replace(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, WNConv1d):
                child = child.folded(polyphase) if isinstance(child, WNConvTranspose1d) else child.folded()
                setattr(parent, name, child)
            if layout_2d and isinstance(child, nn.ConvTranspose1d):
                raise ValueError("2-D layout needs polyphase upsampling (k - u even)")
            if layout_2d and isinstance(child, nn.Conv1d):
                setattr(parent, name, _as_conv2d(child))
            elif not isinstance(child, nn.Conv1d):
                replace(child)

    generator_parts = [model.conv_pre, model.ups, model.resblocks, model.conv_post]
    for part in generator_parts:
        if isinstance(part, WNConv1d):
            continue
        replace(part)
    for name in ("conv_pre", "conv_post"):
        child = getattr(model, name).folded()
        setattr(model, name, _as_conv2d(child) if layout_2d else child)
    model.layout_2d = layout_2d
    if layout_2d:
        model.blocked = _BlockedGenerator(model)
    return model


class _DurationGraph(nn.Module):
    def __init__(self, model: UnitHiFiGAN):
        super().__init__()
        self.dict = model.dict
        self.dur_predictor = model.dur_predictor

    def forward(self, units):
        return self.dur_predictor.frames(self.dict(units).t().unsqueeze(0)).view(-1)


class _GeneratorGraph(nn.Module):
    def __init__(self, model: UnitHiFiGAN, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args, strict=False)))


class _BlockedGenerator(nn.Module):
    """The generator of a 2-D-layout folded model, arranged for ONNX Runtime's NCHWc path.

    Same function as :meth:`UnitHiFiGAN.generate`, rewritten so that every op between the
    first and the last convolution of a level stays in the blocked-channel layout:

    - ORT fuses LeakyRelu into a preceding Conv but has no blocked kernel for a standalone
      one, which would force two layout conversions per residual unit. The pre-activation
      of the residual stream is therefore computed as LeakyRelu(identity depthwise 1x1
      conv), which fuses (cost: one multiply per value).
    - The residual add fuses into the second conv of each unit (NCHWc "Sum" input).
    - The mean over resblocks, ``sum / K``, has its ``1/K`` folded into the weights of the
      next conv (leaky ReLU commutes with a positive scale), so no Div remains.
    - The shared pre-activation of a level is computed once, not once per resblock.
    """

    def __init__(self, folded: UnitHiFiGAN):
        super().__init__()
        kernels = len(folded.config.resblock_kernel_sizes)
        self.kernels = kernels
        self.conv_pre = folded.conv_pre
        self.ups = copy.deepcopy(folded.ups)
        self.resblocks = folded.resblocks
        self.conv_post = copy.deepcopy(folded.conv_post)
        # The 2-D layout has every upsampling layer in polyphase form (fold_weight_norm checks).
        ups = [cast(PolyphaseUpsample, up) for up in self.ups]
        with torch.no_grad():
            for up in ups[1:]:
                up.conv.weight.div_(kernels)
            self.conv_post.weight.div_(kernels)
        for i, up in enumerate(ups):
            channels = up.cout
            self.register_buffer(f"identity{i}", torch.ones(channels, 1, 1, 1))

    def identity(self, x, i):
        weight = getattr(self, f"identity{i}")
        return F.conv2d(x, weight, groups=weight.shape[0])

    def activate(self, x, i):
        return F.leaky_relu(self.identity(x, i), LRELU_SLOPE)

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            # Passing the residual stream through an identity conv too makes it blocked
            # from the start, so that every residual add fuses into its conv. (Chained, not
            # side by side: ORT would merge two identical convs of the same input.)
            x = self.identity(up(F.leaky_relu(x, LRELU_SLOPE)), i)
            shared = self.activate(x, i)
            total = None
            for block in self.resblocks[i * self.kernels : (i + 1) * self.kernels]:
                y, act = x, shared
                pairs = list(zip(block.convs1, block.convs2, strict=False))
                for j, (conv1, conv2) in enumerate(pairs):
                    y = conv2(F.leaky_relu(conv1(act), LRELU_SLOPE)) + y
                    if j + 1 < len(pairs):
                        act = self.activate(y, i)
                total = y if total is None else total + y
            x = total
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


# --------------------------------------------------------------------------- stateful streaming


@dataclass(frozen=True)
class StreamState:
    """One state tensor of :class:`StreamingGenerator`: (1, channels, [1,] length) float32.

    ``initial`` is the length of its first value (zeros): a convolution's left padding, or 0
    for the buffer that holds one operand's surplus until the other operand catches up;
    ``steady`` its length once the stream runs."""

    channels: int
    initial: int
    steady: int


def _conv_sides(conv: nn.Module) -> tuple[int, int]:
    """(left, right) zero padding of a stride-1 convolution that keeps the length."""
    if isinstance(conv, PolyphaseUpsample):
        return conv.pad
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
    span = conv.dilation[-1] * (conv.kernel_size[-1] - 1) + 1
    left = int(conv.padding[-1])  # numeric: fold_weight_norm makes them so
    return left, span - 1 - left


def _conv_unpadded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, nn.Conv2d):
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation)
    assert isinstance(conv, nn.Conv1d)
    return F.conv1d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation)


class _StateIO:
    """The states of one call, taken in the order the network uses them and replaced by
    their next values. Without given states it starts a stream: every state begins at its
    initial value, and ``specs`` describes them."""

    def __init__(self, states: Sequence[torch.Tensor] | None, flush: torch.Tensor):
        self.given = None if states is None else list(states)
        self.flush = flush
        self.next: list[torch.Tensor] = []
        self.specs: list[tuple[int, int]] = []  # (channels, initial length)
        self.shortest = math.inf  # the shortest convolution output of this call
        self.widest_right = 0  # the widest right padding: how many zeros flush must hold

    def take(self, like: torch.Tensor, initial: int) -> torch.Tensor:
        index = len(self.next)
        if self.given is not None:
            return self.given[index]
        self.specs.append((like.shape[1], initial))
        return like.new_zeros(like.shape[:-1] + (initial,))

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``conv`` (zero-padded, stride 1) over the inputs it has, continuing the last call.

        The state is the inputs still needed by outputs not computed yet; it starts as the
        left padding, so the first outputs see the zeros that offline decoding pads with. An
        output is computed once all inputs of its window are there. At the end of the stream
        ``flush`` holds zeros: the right padding, so that the last outputs come too."""
        left, right = _conv_sides(conv)
        self.widest_right = max(self.widest_right, right)
        parts = [self.take(x, left), x]
        if right:
            # flush is (1, 1, [1,] n) zeros: n = 0 while streaming; at the end n >= right.
            zeros = self.flush[..., :right]
            parts.append(zeros.expand(x.shape[:-1] + (zeros.shape[-1],)))
        window = torch.cat(parts, -1)
        self.next.append(window[..., -(left + right) :])  # every convolution here is wider than 1
        unpadded = conv.conv if isinstance(conv, PolyphaseUpsample) else conv
        y = _conv_unpadded(unpadded, window)
        if not torch.jit.is_tracing():  # a Python number only outside the ONNX export
            self.shortest = min(self.shortest, y.shape[-1])
        return conv.interleave(y) if isinstance(conv, PolyphaseUpsample) else y

    def align(self, ahead: torch.Tensor, behind: torch.Tensor) -> torch.Tensor:
        """The values of ``ahead`` at the positions that ``behind`` brings (both streams
        start at position 0; ``ahead`` has come further): its surplus waits in a state."""
        pending = torch.cat([self.take(ahead, 0), ahead], -1)
        count = behind.shape[-1]
        self.next.append(pending[..., count:])
        return pending[..., :count]


class StreamingGenerator(nn.Module):
    """The generator of a folded model (:func:`fold_weight_norm`, polyphase upsampling)
    computed chunk by chunk, each output sample exactly once, equal to the offline network.

    Every convolution keeps the inputs that its later outputs still need as explicit state
    (:meth:`_StateIO.conv`), so its right look-ahead becomes a delay instead of recomputed
    context. Streams that meet (a residual add, the mean over resblocks, whose receptive
    fields differ) are aligned by holding the surplus of the one ahead (:meth:`_StateIO.align`).
    All streams start at absolute position 0; a call emits what its inputs determine, which
    after the first call is exactly the new frames' ``hop_length`` samples each, and the
    whole network lags its input by a fixed ``delay_samples``. The end of the stream is one
    more call with ``flush`` zeros, which pads each layer's right edge as offline decoding
    does (zeros at that layer, not the network's response to zero input).

    ``forward(*frame_inputs, flush, *states) -> (audio, *next_states)`` is the ONNX graph.
    """

    def __init__(self, folded: UnitHiFiGAN, input_names: Sequence[str]):
        super().__init__()
        if not all(isinstance(up, PolyphaseUpsample) for up in folded.ups):
            raise ValueError("the streaming generator needs polyphase upsampling (k - u even)")
        self.model = folded
        self.input_names = list(input_names)
        self.kernels = len(folded.config.resblock_kernel_sizes)
        # Resblocks at one level lag their input by the right padding of their convolutions;
        # the sum over them waits for the slowest.
        blocks = cast(list[ResBlock], list(folded.resblocks[: self.kernels]))
        self.lags = [sum(_conv_sides(c)[1] for c in [*block.convs1, *block.convs2]) for block in blocks]

    def forward(self, *args):
        count = len(self.input_names)
        inputs = dict(zip(self.input_names, args[:count], strict=True))
        audio, io = self.run(inputs, args[count], args[count + 1 :])
        return (audio, *io.next)

    def run(
        self, inputs: dict[str, torch.Tensor], flush: torch.Tensor, states: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, _StateIO]:
        """One call: the audio its frames complete and the states (``io.next``) for the next
        call. ``states=None`` starts a stream (``io.specs`` then describes the states)."""
        io = _StateIO(states, flush)
        x = self.model.features(**inputs)
        blocked = cast("_BlockedGenerator | None", self.model.blocked)
        source: Any = blocked if blocked is not None else self.model  # the same layer names
        x = io.conv(source.conv_pre, x)
        for i, up in enumerate(source.ups):
            x = io.conv(up, F.leaky_relu(x, LRELU_SLOPE))
            if blocked is not None:  # see _BlockedGenerator: pre-activations as fusable convs
                x = blocked.identity(x, i)
                shared = blocked.activate(x, i)
            outs = []
            for block in source.resblocks[i * self.kernels : (i + 1) * self.kernels]:
                y = x
                act = shared if blocked is not None else F.leaky_relu(x, LRELU_SLOPE)
                pairs = list(zip(block.convs1, block.convs2, strict=False))
                for j, (conv1, conv2) in enumerate(pairs):
                    branch = io.conv(conv2, F.leaky_relu(io.conv(conv1, act), LRELU_SLOPE))
                    y = branch + io.align(y, branch)
                    if j + 1 < len(pairs):
                        act = blocked.activate(y, i) if blocked is not None else F.leaky_relu(y, LRELU_SLOPE)
                outs.append(y)
            slowest = outs[self.lags.index(max(self.lags))]
            last = max(self.lags)
            aligned = [out if lag == last else io.align(out, slowest) for out, lag in zip(outs, self.lags, strict=True)]
            total = aligned[0]
            for out in aligned[1:]:
                total = total + out
            x = total if blocked is not None else total / self.kernels
        # The reference's last activation uses leaky_relu's default slope (0.01).
        audio = torch.tanh(io.conv(source.conv_post, F.leaky_relu(x)))
        return audio.reshape(-1), io


@dataclass(frozen=True)
class StreamLayout:
    """What the runtime needs to drive a :class:`StreamingGenerator`."""

    states: tuple[StreamState, ...]
    delay_samples: int  # samples that the audio lags the frames fed (after the first call)
    min_first_frames: int  # the first call (unless it ends the stream) needs this many frames
    flush_length: int


def stream_layout(stream: StreamingGenerator, example: dict[str, torch.Tensor]) -> StreamLayout:
    """The states, delay and first-call minimum of ``stream``, measured on shapes alone
    (a copy on the meta device: nothing is computed). ``example`` gives one value of each
    per-frame input (and the global ones)."""
    meta = copy.deepcopy(stream).to("meta")
    hop = stream.model.config.hop_length
    flush = torch.zeros((1, 1) + ((1,) if stream.model.layout_2d else ()) + (0,), device="meta")

    def first_call(frames: int) -> tuple[int, _StateIO]:
        inputs = {
            k: (v[:1].expand(frames) if k in ("units", "pitch", "style_codes") else v).to("meta")
            for k, v in example.items()
        }
        audio, io = meta.run(inputs, flush)
        return audio.shape[0], io

    for frames in range(1, 4097):
        try:
            samples, io = first_call(frames)
        except RuntimeError as exc:  # a convolution without a complete window
            if "Kernel size" not in str(exc):
                raise
            continue
        if io.shortest >= 1 and samples >= 1:
            break
    else:
        raise ValueError("streaming generator: no first call of up to 4096 frames makes audio")
    delay = frames * hop - samples
    # Once every state is full the lag is constant: check it one frame later.
    later, later_io = first_call(frames + 1)
    if (frames + 1) * hop - later != delay:
        raise AssertionError("streaming generator: the delay is not constant")
    states = tuple(
        StreamState(channels=int(c), initial=int(init), steady=int(s.shape[-1]))
        for (c, init), s in zip(later_io.specs, later_io.next, strict=True)
    )
    return StreamLayout(states, delay, frames, later_io.widest_right)


def _export(
    module: nn.Module,
    args: tuple,
    names: list[str],
    outputs: str | list[str],
    opset: int,
    axes: dict[str, dict[int, str]] | None = None,
) -> bytes:
    outputs = [outputs] if isinstance(outputs, str) else outputs
    dynamic = {n: {0: "frames"} for n in names if n in ("units", "pitch", "style_codes")}
    dynamic[outputs[0]] = {0: "samples" if outputs[0] == "audio" else "frames"}
    dynamic.update(axes or {})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (deterministic, fine for this graph) warns about itself.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            cast(Any, buffer),  # a file-like object is accepted, whatever the annotation says
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _export_stream(
    folded: UnitHiFiGAN, example: dict[str, torch.Tensor], bundle_dir: Path, opset: int, layout: str
) -> dict[str, Any]:
    """Write ``vocoder_stream.onnx`` (see :class:`StreamingGenerator`); returns its bundle.json entry."""
    stream = StreamingGenerator(folded, list(example)).eval()
    plan = stream_layout(stream, example)
    time_axis = 3 if folded.layout_2d else 2
    middle = (1,) if folded.layout_2d else ()
    states = [torch.zeros((1, s.channels) + middle + (s.initial,)) for s in plan.states]
    flush = torch.zeros((1, 1) + middle + (0,))
    frames = max(plan.min_first_frames, 4)
    args = tuple(v[:1].expand(frames).contiguous() if v.shape[0] > 1 else v for v in example.values())
    names = list(example)
    state_in = [f"state{i}" for i in range(len(states))]
    state_out = [f"state{i}_next" for i in range(len(states))]
    axes = {n: {time_axis: "length"} for n in ["flush", *state_in, *state_out]}
    with torch.no_grad():
        inputs = [*names, "flush", *state_in]
        data = _export(stream, (*args, flush, *states), inputs, ["audio", *state_out], opset, axes)
    (bundle_dir / STREAM_ONNX_FILE).write_bytes(data)
    return {
        "file": STREAM_ONNX_FILE,
        "opset": opset,
        "inputs": names,
        "outputs": ["audio"],
        "layout": layout,
        "hop_length": folded.config.hop_length,
        "delay_samples": plan.delay_samples,
        "min_first_frames": plan.min_first_frames,
        "flush": {"input": "flush", "length": plan.flush_length},
        "states": [
            {"input": i, "output": o, "shape": [1, s.channels, *middle, s.initial], "steady_length": s.steady}
            for i, o, s in zip(state_in, state_out, plan.states, strict=True)
        ],
    }


def export_onnx(
    paths: CheckpointPaths | None,
    variant: str,
    bundle_dir: str | Path,
    opset: int = 17,
    model: UnitHiFiGAN | None = None,
    layout: str = "blocked",
    streaming: bool = True,
    stream_layout: str | None = None,
) -> dict:
    """Export the vocoder of ``variant`` into ``bundle_dir`` and record it in bundle.json.

    Writes ``vocoder.onnx`` (generator on per-frame inputs), with ``streaming``
    ``vocoder_stream.onnx`` (the same generator with explicit state, see
    :class:`StreamingGenerator`) and, if the model has a duration predictor,
    ``vocoder_duration.onnx``. ``model`` overrides loading from ``paths`` (benchmarks pass
    a random full-size model). ``layout`` and ``stream_layout`` (default: ``layout``) pick
    the graphs' arrangement (see ``LAYOUTS``); both compute the same function. Returns the
    manifest.
    """
    check_variant(variant)
    if model is None:
        if paths is None:
            raise ValueError("export_onnx needs the checkpoint paths or a model")
        model = load_vocoder(paths, variant)
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    stream_layout = layout if stream_layout is None else stream_layout
    for given in (layout, stream_layout):
        if given not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {given!r}")
    # The blocked layout and the streaming graph need every upsampling layer in polyphase
    # form (k - u even); the release's are.
    if not all((k - u) % 2 == 0 for u, k in zip(config.upsample_rates, config.upsample_kernel_sizes, strict=False)):
        layout, streaming = "plain", False
    plain = fold_weight_norm(model, layout_2d=layout == "blocked")

    frames = 12
    example = {"units": torch.arange(frames) % config.num_embeddings}
    if config.num_f0_tokens:
        example["pitch"] = torch.arange(frames) % config.num_f0_tokens
    if config.num_style_tokens:
        example["style_codes"] = torch.arange(frames) % config.num_style_tokens
    if config.multispkr:
        example["speaker"] = torch.tensor([0])
    if config.multistyle:
        example["style_id"] = torch.tensor([0])
    names = list(example)
    with torch.no_grad():
        data = _export(_GeneratorGraph(plain, names), tuple(example.values()), names, "audio", opset)
    (bundle_dir / ONNX_FILE).write_bytes(data)

    left, right = generator_context(config)
    entry = {
        "file": ONNX_FILE,
        "opset": opset,
        "inputs": names,
        "outputs": ["audio"],
        "sample_rate": SAMPLE_RATE,
        "hop_length": config.hop_length,
        "num_units": config.num_embeddings,
        "num_pitch": config.num_f0_tokens,
        "num_style_codes": config.num_style_tokens,
        "num_speakers": config.num_speakers if config.multispkr else 0,
        "num_styles": config.num_styles if config.multistyle else 0,
        "speakers": list(model.speakers),
        "styles": list(model.styles),
        "default_speaker": DEFAULT_SPEAKER if config.multispkr else None,
        "default_style": BASE_DEFAULT_STYLE if config.multistyle else None,
        "code_hop_size": config.code_hop_size,
        "f0_hop_size": config.f0_hop_size,
        "style_hop_size": config.style_hop_size,
        "pitch_upsample": config.pitch_upsample,
        "style_upsample": config.style_upsample,
        "context_frames": {"left": left, "right": right},
        "has_duration": model.dur_predictor is not None,
        "layout": layout,
    }
    manifest = add_component(bundle_dir, "vocoder", entry, variant=variant, sample_rate=SAMPLE_RATE)
    if streaming:
        folded = plain if stream_layout == layout else fold_weight_norm(model, layout_2d=stream_layout == "blocked")
        stream_entry = _export_stream(folded, example, bundle_dir, opset, stream_layout)
        manifest = add_component(bundle_dir, "vocoder_stream", stream_entry, variant=variant)
    if model.dur_predictor is not None:
        with torch.no_grad():
            data = _export(_DurationGraph(plain), (example["units"],), ["units"], "durations", opset)
        (bundle_dir / DURATION_ONNX_FILE).write_bytes(data)
        d_left, d_right = duration_context(config)
        manifest = add_component(
            bundle_dir,
            "vocoder_duration",
            {
                "file": DURATION_ONNX_FILE,
                "opset": opset,
                "inputs": ["units"],
                "outputs": ["durations"],
                "context_units": {"left": d_left, "right": d_right},
            },
            variant=variant,
        )
    return manifest
