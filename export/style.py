"""Style speech encoder (Expressive, 1 Hz): wav2vec2-base sequence classifier.

Release files (spec section 4): ``style_encoder_w2v2/config.json`` (Hugging Face
``Wav2Vec2ForSequenceClassification`` config) + ``pytorch_model.bin`` (its state dict).
The reference normalises the waveform to zero mean / unit variance (HF feature extractor,
eps 1e-7), takes the last hidden state, applies ``projector``, averages windows of 50
frames (the last, partial window averages what it has), applies ``classifier`` and takes
the argmax: one style per second, ``ceil(frames / 50)`` of them.

The wav2vec2 trunk has HuBERT base's architecture, so it runs on
:class:`~spiritlm_edge.export.hubert.SpeechEncoder`; HF parameter names are mapped onto
fairseq's here and checked strictly under their HF names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    load_json,
    load_state_dict_strictly,
    load_torch_file,
)
from spiritlm_edge.export.hubert import EncoderConfig, EncoderGraph, SpeechEncoder, export_graph_onnx
from spiritlm_edge.runtime.bundle import add_component
from spiritlm_edge.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

WINDOW_FRAMES = 50  # the reference's pool_size: 50 frames of 20 ms = 1 s
CONFIG_WHAT = "style encoder config"
WEIGHTS_WHAT = "style encoder weights"
ONNX_FILE = "style.onnx"
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean-unit-variance epsilon
# In the state dict but unused by the reference's forward (masking is training-only, the
# weighted layer sum is bypassed, _float_tensor is the reference's device marker).
UNUSED_KEYS = ("wav2vec2.masked_spec_embed", "layer_weights", "_float_tensor")

_HF_RULES = [  # fairseq name (ours) -> HF name
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.", r"feature_extractor.conv_layers.\1.layer_norm."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.", r"feature_extractor.conv_layers.\1.layer_norm."),
    (r"^layer_norm\.", "feature_projection.layer_norm."),
    (r"^post_extract_proj\.", "feature_projection.projection."),
    (r"^encoder\.pos_conv\.0\.", "encoder.pos_conv_embed.conv."),
    (r"\.self_attn\.", ".attention."),
    (r"\.self_attn_layer_norm\.", ".layer_norm."),
    (r"\.fc1\.", ".feed_forward.intermediate_dense."),
    (r"\.fc2\.", ".feed_forward.output_dense."),
]


def hf_name(key: str, prefix: str = "wav2vec2.") -> str:
    """Our (fairseq) parameter name -> the Hugging Face wav2vec2/HuBERT name."""
    for pattern, replacement in _HF_RULES:
        key = re.sub(pattern, replacement, key)
    return prefix + key


def _canonical_weight_norm(key: str) -> str:
    # Newer transformers save weight norm as parametrizations; older ones as weight_g/weight_v.
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"
    )


class StyleModel(nn.Module):
    """wav2vec2 trunk + projector + classifier (the parts of the HF model the reference uses)."""

    def __init__(self, config: EncoderConfig, proj_size: int, num_labels: int):
        super().__init__()
        self.encoder = SpeechEncoder(config)
        self.projector = nn.Linear(config.embed_dim, proj_size)
        self.classifier = nn.Linear(proj_size, num_labels)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Reference computation for one chunk: audio [N] -> style codes int64 [ceil(T/50)]."""
        x = audio.reshape(-1).double()
        x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORM_EPS)).float()
        hidden = self.projector(self.encoder(x[None])[0])
        pooled = torch.stack([w.mean(0) for w in hidden.split(WINDOW_FRAMES)])
        return self.classifier(pooled).argmax(-1)


class _HFNamed:
    """Presents a :class:`StyleModel` under HF parameter names to the strict loader."""

    def __init__(self, model: StyleModel):
        self.model = model
        self.names = {}
        for key in model.state_dict():
            if key.startswith("encoder."):
                self.names[hf_name(key[len("encoder.") :])] = key
            else:
                self.names[key] = key

    def state_dict(self) -> dict[str, torch.Tensor]:
        ours = self.model.state_dict()
        return {hf: ours[key] for hf, key in self.names.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict({self.names[k]: v for k, v in state.items()})


def encoder_config_from_hf(cfg: Mapping[str, Any], path: Path) -> tuple[EncoderConfig, int, int]:
    """(trunk config, projector size, number of styles) from an HF Wav2Vec2 config dict."""
    # transformers (heavy, not needed by export/'s other modules) parses the released config
    from transformers import Wav2Vec2Config

    try:
        hf = Wav2Vec2Config.from_dict(dict(cfg))
    except Exception as exc:  # transformers raises assorted errors on bad values
        raise CheckpointError(f"{CONFIG_WHAT} {path} is not a Wav2Vec2 config: {exc}.") from None
    checks = {
        "feat_extract_norm": (hf.feat_extract_norm, ("group", "layer")),
        "do_stable_layer_norm": (hf.do_stable_layer_norm, (False,)),
        "hidden_act": (hf.hidden_act, ("gelu",)),
        "feat_extract_activation": (hf.feat_extract_activation, ("gelu",)),
        "num_conv_pos_embedding_groups": (hf.num_conv_pos_embedding_groups > 0, (True,)),
    }
    if getattr(hf, "num_feat_extract_layers", len(hf.conv_dim)) != len(hf.conv_dim):
        raise CheckpointError(f"{CONFIG_WHAT} {path}: num_feat_extract_layers disagrees with conv_dim.")
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise CheckpointError(
                f"{CONFIG_WHAT} {path}: {key}={value!r} is not supported (wav2vec2-base has "
                f"{allowed[0]!r}). Is this the release's style_encoder_w2v2/config.json?"
            )
    if not (len(hf.conv_dim) == len(hf.conv_kernel) == len(hf.conv_stride)):
        raise CheckpointError(f"{CONFIG_WHAT} {path}: conv_dim, conv_kernel and conv_stride differ in length.")
    config = EncoderConfig(
        conv_layers=tuple(
            (int(d), int(k), int(s)) for d, k, s in zip(hf.conv_dim, hf.conv_kernel, hf.conv_stride, strict=False)
        ),
        extractor_mode="default" if hf.feat_extract_norm == "group" else "layer_norm",
        conv_bias=bool(hf.conv_bias),
        embed_dim=hf.hidden_size,
        ffn_dim=hf.intermediate_size,
        heads=hf.num_attention_heads,
        layers=hf.num_hidden_layers,
        conv_pos=hf.num_conv_pos_embeddings,
        conv_pos_groups=hf.num_conv_pos_embedding_groups,
        eps=float(hf.layer_norm_eps),
        project=True,  # HF's feature projection always has its Linear
    )
    config.check(path, CONFIG_WHAT)
    return config, int(hf.classifier_proj_size), int(hf.num_labels)


def load_style_encoder(paths: CheckpointPaths) -> StyleModel:
    """The release's style encoder as a :class:`StyleModel` (eval mode)."""
    config_path = paths.style_encoder_dir / "config.json"
    weights_path = paths.style_encoder_dir / "pytorch_model.bin"
    config, proj_size, num_labels = encoder_config_from_hf(load_json(config_path, CONFIG_WHAT), config_path)
    if num_labels != 100:
        raise CheckpointError(
            f"{CONFIG_WHAT} {config_path} has {num_labels} labels; Spirit LM has 100 styles ([St0]..[St99])."
        )
    state = load_torch_file(weights_path, WEIGHTS_WHAT)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{WEIGHTS_WHAT} {weights_path} holds a {type(state).__name__}, expected a state dict.")
    state = {_canonical_weight_norm(k): v for k, v in state.items() if k not in UNUSED_KEYS}
    model = StyleModel(config, proj_size, num_labels)
    load_state_dict_strictly(_HFNamed(model), state, weights_path, WEIGHTS_WHAT)
    return model.eval()


# ----------------------------------------------------------------------------- ONNX


class StyleGraph(nn.Module):
    """Audio [1, N] -> (styles int64 [W], pooled projector output [W, P]); W = ceil(T / 50)."""

    def __init__(self, model: StyleModel, frontend: str = "fused"):
        super().__init__()
        self.encoder = EncoderGraph(model.encoder, model.encoder.config.layers, "zero_mean_unit_var", frontend)
        self.projector = model.projector
        self.classifier = model.classifier

    def forward(self, audio: torch.Tensor):
        hidden = self.projector(self.encoder(audio))  # [T, P]
        frames = hidden.shape[0]
        windows = (frames + WINDOW_FRAMES - 1) // WINDOW_FRAMES
        padded = nn.functional.pad(hidden, (0, 0, 0, windows * WINDOW_FRAMES - frames))
        sums = padded.reshape(windows, WINDOW_FRAMES, -1).sum(1)
        # frames per window: 50, except the last one
        counts = torch.clamp(frames - torch.arange(windows) * WINDOW_FRAMES, max=WINDOW_FRAMES)
        pooled = sums / counts.to(sums.dtype)[:, None]
        return self.classifier(pooled).argmax(-1), pooled


def export_onnx(
    paths: CheckpointPaths, variant: str, bundle_dir: str | Path, opset: int = 17, frontend: str = "fused"
) -> dict:
    """Export the style encoder to ``<bundle>/style.onnx`` and register component "style"."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    model = load_style_encoder(paths)
    config = model.encoder.config
    export_graph_onnx(
        StyleGraph(model, frontend),
        bundle_dir / ONNX_FILE,
        torch.zeros(1, 16000),
        ["styles", "pooled"],
        {"styles": {0: "windows"}, "pooled": {0: "windows"}},
        opset,
    )
    entry = {
        "file": ONNX_FILE,
        "opset": opset,
        "inputs": {"audio": "float32 [1, samples], mono 16 kHz (normalised inside the graph)"},
        "outputs": {"styles": "int64 [windows], 0..99", "pooled": "float32 [windows, proj]"},
        "hop_samples": config.hop_samples,
        "window_frames": WINDOW_FRAMES,
        "rate_hz": 16000 / (config.hop_samples * WINDOW_FRAMES),
        "min_samples": max(1280, config.min_samples),
        "frames_min_samples": config.min_samples,
        "num_styles": model.classifier.out_features,
    }
    return add_component(bundle_dir, "style", entry, variant=variant)
