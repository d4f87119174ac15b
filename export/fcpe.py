"""FCPE, the F0 estimator Spirit LM Expressive's pitch tokenizer runs (spec section 4).

The weights are the model shipped inside the ``torchfcpe`` pip package (MIT licence,
version 0.0.4: ``torchfcpe/assets/fcpe_c_v001.pt``). ``import torchfcpe`` needs
torchaudio, which would pull a second PyTorch, so this module defines the network itself
and only reads the package's file. The checkpoint holds ``config_dict`` (mel front end
and model hyper-parameters) and ``model`` (state dict); the bundled model is the
conv-only "CFNaiveMelPE": log-mel (STFT -> slaney mel) -> Conv/GroupNorm stack -> N
conformer convolution modules -> LayerNorm -> weight-normed Linear -> sigmoid over 360
cent bins, decoded by a weighted mean of the 9 bins around the arg-max ("local_argmax").

The STFT is a strided Conv1d with fixed windowed-DFT kernels and the mel filterbank a
fixed matrix, so the ONNX graph holds only Pad/Conv/MatMul and friends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spiritlm_edge.export.checkpoints import get_key, load_state_dict_strictly, load_torch_file
from spiritlm_edge.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

FCPE_WEIGHTS_ENV = "SPIRITLM_FCPE_WEIGHTS"
FCPE_PACKAGE = "torchfcpe"
FCPE_PACKAGE_FILE = "assets/fcpe_c_v001.pt"
INSTALL_HINT = "pip install --no-deps torchfcpe==0.0.4"
# log(max(mel, CLIP)) as in torchfcpe's mel extractor.
MEL_CLIP = 1e-5
# local_argmax decoding: weighted mean over the arg-max bin and 4 bins either side.
LOCAL_HALF_WIDTH = 4


# -- finding the weights ------------------------------------------------------------------


def _package_weights() -> Path | None:
    """fcpe_c_v001.pt inside the installed torchfcpe package, found without importing it
    (its __init__ imports torchaudio)."""
    try:
        candidate = Path(
            importlib.metadata.distribution(FCPE_PACKAGE).locate_file(f"{FCPE_PACKAGE}/{FCPE_PACKAGE_FILE}")
        )
        if candidate.is_file():
            return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    # A top-level find_spec locates the package without executing it.
    spec = importlib.util.find_spec(FCPE_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FCPE_PACKAGE_FILE
        if candidate.is_file():
            return candidate
    return None


def find_fcpe_weights(path: str | os.PathLike | None = None) -> Path:
    """The FCPE checkpoint: ``path`` if given, else ``$SPIRITLM_FCPE_WEIGHTS``, else the
    copy inside the installed torchfcpe package."""
    if path is None:
        path = os.environ.get(FCPE_WEIGHTS_ENV) or None
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"FCPE weights {path} do not exist. Give the path of fcpe_c_v001.pt (shipped in the "
                f"torchfcpe package: `{INSTALL_HINT}`)."
            )
        return path
    found = _package_weights()
    if found is None:
        raise CheckpointError(
            "The FCPE pitch estimator's weights were not found: install the torchfcpe package "
            f"without its dependencies (`{INSTALL_HINT}`), or pass --fcpe-weights / set "
            f"{FCPE_WEIGHTS_ENV} to the path of fcpe_c_v001.pt."
        )
    return found


# -- mel front end ------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular filters on the slaney mel scale with slaney (area)
    normalisation: librosa.filters.mel's defaults, which torchfcpe uses."""
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_points = _mel_to_hz_slaney(mel_points)
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    return weights.astype(np.float32)


def windowed_dft_kernels(n_fft: int, win_size: int) -> np.ndarray:
    """Conv1d weights [2*(n_fft//2+1), 1, n_fft]: real then imaginary parts of a one-sided
    DFT times a periodic Hann window (torch.stft's window, centred in n_fft)."""
    n = np.arange(win_size, dtype=np.float64)
    window = np.zeros(n_fft)
    offset = (n_fft - win_size) // 2
    window[offset : offset + win_size] = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_size)
    bins = np.arange(n_fft // 2 + 1)[:, None]
    t = np.arange(n_fft)[None, :]
    # Reduce k*t modulo n_fft before scaling: exact angles for every bin.
    angle = 2.0 * np.pi * ((bins * t) % n_fft) / n_fft
    kernels = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window], axis=0)
    return kernels[:, None, :].astype(np.float32)


class LogMel(nn.Module):
    """Waveform [B, N] -> log-mel [B, n_mels, N//hop + 1], as torchfcpe's Wav2MelModule
    (no key shift, centre=False, reflect padding, last frame repeated once)."""

    def __init__(self, sr: int, n_mels: int, n_fft: int, win_size: int, hop: int, fmin: float, fmax: float):
        super().__init__()
        self.hop = hop
        self.n_bins = n_fft // 2 + 1
        self.pad_left = (win_size - hop) // 2
        self.pad_right = (win_size - hop + 1) // 2
        # Fixed tensors, rebuilt from the config: not part of the checkpoint.
        self.register_buffer("dft", torch.from_numpy(windowed_dft_kernels(n_fft, win_size)), persistent=False)
        self.register_buffer(
            "mel_basis", torch.from_numpy(slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)), persistent=False
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = F.pad(audio.unsqueeze(1), (self.pad_left, self.pad_right), mode="reflect")
        spec = F.conv1d(x, self.dft, stride=self.hop)
        real, imag = spec[:, : self.n_bins], spec[:, self.n_bins :]
        magnitude = torch.sqrt(real * real + imag * imag + 1e-9)
        mel = torch.log(torch.clamp(torch.matmul(self.mel_basis, magnitude), min=MEL_CLIP))
        # With reflect padding the STFT gives N//hop frames; the reference wants N//hop + 1
        # and repeats the last one.
        return torch.cat([mel, mel[:, :, -1:]], dim=2)


# -- network ------------------------------------------------------------------------------
# Module names follow torchfcpe's state dict. Its nn.Sequential containers also hold
# parameter-free ops (transposes, GLU, SiLU, dropout) at the indices missing below.


class ConformerConv(nn.Module):
    """LayerNorm -> 1x1 conv to 4C -> GLU -> depthwise conv (k=31) -> SiLU -> 1x1 conv to C."""

    def __init__(self, dim: int, expansion: int = 2, kernel_size: int = 31):
        super().__init__()
        inner = dim * expansion
        self.net = nn.ModuleDict(
            {
                "0": nn.LayerNorm(dim),
                "2": nn.Conv1d(dim, inner * 2, 1),
                "4": nn.ModuleDict(
                    {"conv": nn.Conv1d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner)}
                ),
                "6": nn.Conv1d(inner, dim, 1),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        h = self.net["0"](x).transpose(1, 2)
        h = F.glu(self.net["2"](h), dim=1)
        h = F.silu(self.net["4"]["conv"](h))
        return self.net["6"](h).transpose(1, 2)


class ConvOnlyLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conformer = ConformerConv(dim)
        # Pre-attention LayerNorm: stored in the checkpoint, unused by conv-only models.
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conformer(x)


class Encoder(nn.Module):
    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.encoder_layers = nn.ModuleList([ConvOnlyLayer(dim) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder_layers:
            x = layer(x)
        return x


class WeightNormLinear(nn.Module):
    """Linear layer stored as weight-norm parameters (weight = g * v / ||v||, per row)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(n_out, 1))
        self.weight_v = nn.Parameter(torch.zeros(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight, self.bias)


class FCPE(nn.Module):
    """Waveform [B, N] (16 kHz) -> (f0 in Hz, confidence), each [B, N//hop + 1].

    f0 is the local-argmax decoding of every frame; the reference calls a frame unvoiced
    (f0 = 0) when its confidence (the largest bin activation) is <= the threshold, which
    the runtime applies so that the threshold stays a setting.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        mel, model = config["mel"], config["model"]
        self.sample_rate = int(mel["sr"])
        self.hop = int(mel["hop_size"])
        self.f0_min = float(model["f0_min"])
        hidden, n_mels, out_dims = int(model["hidden_dims"]), int(mel["num_mels"]), int(model["out_dims"])
        self.out_dims = out_dims
        self.mel = LogMel(
            self.sample_rate,
            n_mels,
            int(mel["n_fft"]),
            int(mel["win_size"]),
            self.hop,
            float(mel.get("fmin") or 0),
            float(mel.get("fmax") or self.sample_rate / 2),
        )
        self.input_stack = nn.ModuleDict(
            {
                "0": nn.Conv1d(n_mels, hidden, 3, 1, 1),
                "1": nn.GroupNorm(4, hidden),
                "3": nn.Conv1d(hidden, hidden, 3, 1, 1),
            }
        )
        self.harmonic_emb = nn.Embedding(9, hidden) if model.get("use_harmonic_emb") else None
        self.net = Encoder(hidden, int(model["n_layers"]))
        self.norm = nn.LayerNorm(hidden)
        self.output_proj = WeightNormLinear(hidden, out_dims)
        # Checkpoint buffers: cent value of every output bin, and a training-only constant.
        self.register_buffer("cent_table", torch.zeros(out_dims))
        self.register_buffer("gaussian_blurred_cent_mask", torch.zeros(()))
        self.register_buffer("local_offsets", torch.arange(-LOCAL_HALF_WIDTH, LOCAL_HALF_WIDTH + 1), persistent=False)

    def activations(self, audio: torch.Tensor) -> torch.Tensor:
        """Sigmoid activations over the cent bins, [B, T, out_dims]."""
        x = self.mel(audio)
        x = self.input_stack["0"](x)
        x = F.leaky_relu(self.input_stack["1"](x), 0.01)
        x = self.input_stack["3"](x).transpose(1, 2)
        if self.harmonic_emb is not None:  # inference uses harmonic index 0
            x = x + self.harmonic_emb.weight[0]
        x = self.norm(self.net(x))
        return torch.sigmoid(self.output_proj(x))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.activations(audio)
        confidence, best = torch.max(y, dim=-1, keepdim=True)
        window = torch.clamp(best + self.local_offsets, 0, self.out_dims - 1)
        weights = torch.gather(y, -1, window)
        cents = torch.sum(weights * self.cent_table[window], dim=-1) / torch.sum(weights, dim=-1)
        f0 = 10.0 * torch.pow(2.0, cents / 1200.0)
        return f0, confidence.squeeze(-1)


# -- loading ------------------------------------------------------------------------------

_REQUIRED = {
    "mel": ("sr", "num_mels", "n_fft", "win_size", "hop_size"),
    "model": ("type", "out_dims", "hidden_dims", "n_layers", "f0_min", "f0_max"),
}


def check_fcpe_config(config: Any, path: Path) -> dict:
    what = "FCPE checkpoint"
    for section, keys in _REQUIRED.items():
        block = get_key(config, section, path, f"{what} config_dict of")
        for key in keys:
            if get_key(block, key, path, f"{what} config_dict[{section!r}] of") is None:
                raise CheckpointError(f"{what} {path}: config_dict[{section!r}][{key!r}] is empty.")
    model, mel = config["model"], config["mel"]
    if model["type"] != "CFNaiveMelPE":
        raise CheckpointError(
            f"{what} {path} holds a {model['type']!r} model; only torchfcpe's CFNaiveMelPE "
            "(fcpe_c_v001.pt) is supported."
        )
    if not model.get("conv_only", False):
        raise CheckpointError(
            f"{what} {path} has attention layers (conv_only is false); only the conv-only FCPE "
            f"shipped in torchfcpe 0.0.4 (fcpe_c_v001.pt) is supported. Install it: `{INSTALL_HINT}`."
        )
    if str(mel.get("type", "default")).lower() not in ("none", "default"):
        raise CheckpointError(f"{what} {path} uses mel type {mel['type']!r}; only the default log-mel is supported.")
    if int(model["hidden_dims"]) % 4:
        raise CheckpointError(f"{what} {path}: hidden_dims must be a multiple of 4 (GroupNorm of 4 groups).")
    return config


def load_fcpe(path: str | os.PathLike | None = None) -> FCPE:
    """The FCPE network with the checkpoint's weights, loaded strictly, in eval mode."""
    path = find_fcpe_weights(path)
    checkpoint = load_torch_file(path, "FCPE checkpoint")
    config = check_fcpe_config(get_key(checkpoint, "config_dict", path, "FCPE checkpoint"), path)
    state = get_key(checkpoint, "model", path, "FCPE checkpoint")
    model = FCPE(config)
    load_state_dict_strictly(model, state, path, "FCPE checkpoint")
    model.eval()
    log.debug("FCPE loaded from %s", path)
    return model
