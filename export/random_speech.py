"""Random-weight speech checkpoints in the release's formats: tiny ones for tests and the
demo, full-size ones (the released shapes) for benchmarks.

Every file is what the release holds (fairseq HuBERT + quantizer, the pitch VQ-VAE's
config.yaml + model.pt, the style encoder's transformers config + weights, the unit
HiFi-GAN's config, generator and speaker lists), so the loaders under test are the ones a
user with the real checkpoints runs. Random weights are nudged where a purely random model
would be degenerate: the unit, pitch and style classifiers are centred on features of the
bundled LibriSpeech clip so real speech maps to many different codes.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.export.fcpe import load_fcpe
from spiritlm_edge.export.hubert import (
    FULL_SIZE_CONV_LAYERS,
    TINY_CONV_LAYERS,
    EncoderConfig,
    HubertCheckpoint,
    LinearQuantizer,
    SpeechEncoder,
    parse_conv_layers,
    reference_features,
)
from spiritlm_edge.export.pitch import CODEBOOK_SIZE, CONFIG_FILE, MODEL_FILE, PitchTokenizer, PitchVQVAE
from spiritlm_edge.export.style import (
    NORM_EPS,
    UNUSED_KEYS,
    WINDOW_FRAMES,
    StyleModel,
    _canonical_weight_norm,
    _HFNamed,
    encoder_config_from_hf,
)
from spiritlm_edge.export.vocoder import UnitHiFiGAN, VocoderConfig, model_config
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, load_audio

# -- HuBERT + quantizer ------------------------------------------------------------------------


def _model_cfg(config: EncoderConfig) -> dict[str, Any]:
    """A fairseq HubertConfig dict as the converted release files hold it."""
    return {
        "label_rate": 25.0,
        "extractor_mode": config.extractor_mode,
        "encoder_layers": config.layers,
        "encoder_embed_dim": config.embed_dim,
        "encoder_ffn_embed_dim": config.ffn_dim,
        "encoder_attention_heads": config.heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.1,
        "dropout_features": 0.1,
        "final_dim": 256,
        "untie_final_proj": False,
        "layer_norm_first": False,
        "conv_feature_layers": _conv_spec(config.conv_layers),
        "conv_bias": config.conv_bias,
        "logit_temp": 0.1,
        "target_glu": False,
        "feature_grad_mult": 0.1,
        "mask_length": 10,
        "mask_prob": 0.8,
        "mask_selection": "static",
        "mask_other": 0.0,
        "no_mask_overlap": False,
        "mask_min_space": 1,
        "mask_channel_length": 10,
        "mask_channel_prob": 0.0,
        "mask_channel_selection": "static",
        "mask_channel_other": 0.0,
        "no_mask_channel_overlap": False,
        "mask_channel_min_space": 1,
        "conv_pos": config.conv_pos,
        "conv_pos_groups": config.conv_pos_groups,
        "latent_temp": [2.0, 0.5, 0.999995],
        "skip_masked": False,
        "skip_nomask": False,
        "checkpoint_activations": False,
        "required_seq_len_multiple": 2,
    }


def _conv_spec(layers) -> str:
    """Run-length Python-literal form, like fairseq's configs: "[(512,10,5)] + [(512,3,2)] * 4"."""
    runs: list[list] = []
    for layer in layers:
        if runs and runs[-1][0] == tuple(layer):
            runs[-1][1] += 1
        else:
            runs.append([tuple(layer), 1])
    return " + ".join(f"[({d},{k},{s})]" + (f" * {n}" if n > 1 else "") for (d, k, s), n in runs)


@torch.no_grad()
def _centre_quantizer(quantizer: LinearQuantizer, features: torch.Tensor, generator: torch.Generator) -> None:
    """Make random-weight units informative: the last layer becomes a nearest-prototype
    classifier whose 501 prototypes are (jittered) hidden vectors of random speech frames.
    A plain random MLP puts almost every frame on the same few argmax units."""
    hidden = quantizer.encoder[:4](features)  # [T, h2]
    picks = torch.randint(0, hidden.shape[0], (quantizer.vocab_size + 1,), generator=generator)
    spread = hidden.std(0, keepdim=True)
    prototypes = hidden[picks] + 0.3 * spread * torch.randn(len(picks), hidden.shape[1], generator=generator)
    last = quantizer.encoder[4]
    assert isinstance(last, torch.nn.Linear)  # the quantizer MLP's output layer
    last.weight.copy_(prototypes)
    last.bias.copy_(-0.5 * (prototypes * prototypes).sum(1))  # argmax = nearest prototype
    # Like a CTC model, emit the blank (last row) on a share of the frames (~15%), so
    # that blank filling is exercised: blank scores the centroid, biased to win that often.
    blank = quantizer.vocab_size
    best_other = last(hidden)[:, :blank].max(1).values
    centroid = hidden.mean(0)
    last.weight[blank] = centroid
    last.bias[blank] = torch.quantile(best_other - hidden @ centroid, 0.15)


def write_hubert(paths: CheckpointPaths, variant: str = "base", seed: int = 0, size: str = "tiny") -> None:
    """Write random-weight ``mhubert_base_25hz.pt`` + ``L11_quantizer_500.pt`` in the release format.

    ``size="tiny"``: 12 layers of width 64, seconds to write. ``size="full"``: the release's
    shapes (HuBERT base 25 Hz, 768 wide, ~95M parameters + 1.3M quantizer) for benchmarks.
    """
    if size == "tiny":
        config = EncoderConfig(
            tuple(parse_conv_layers(TINY_CONV_LAYERS)),
            embed_dim=64,
            ffn_dim=128,
            heads=2,
            layers=12,
            conv_pos=16,
            conv_pos_groups=4,
        )
        upstream_dim = 565  # hidden sizes 48 and 32
    elif size == "full":
        config = EncoderConfig(tuple(parse_conv_layers(FULL_SIZE_CONV_LAYERS)))
        upstream_dim = config.embed_dim  # hidden sizes 702 and 635
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisers draw from the global generator
    encoder = SpeechEncoder(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():  # non-trivial norms/biases so they are tested
            if name.endswith("bias") or ("norm" in name and name.endswith("weight")):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
    quantizer = LinearQuantizer(500, config.embed_dim, upstream_dim).eval()
    hubert = HubertCheckpoint(encoder, normalize=False, sample_rate=16000)
    _centre_quantizer(quantizer, reference_features(hubert, load_audio(BUNDLED_CLIP)), generator)

    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    final_dim = 256 if size == "full" else 16
    state["mask_emb"] = torch.rand(config.embed_dim, generator=generator)
    state["label_embs_concat"] = torch.rand(504, final_dim, generator=generator)
    state["final_proj.weight"] = torch.randn(final_dim, config.embed_dim, generator=generator) * 0.02
    state["final_proj.bias"] = torch.zeros(final_dim)
    model_cfg = _model_cfg(config)
    model_cfg["final_dim"] = final_dim
    checkpoint = {
        "model_cfg": model_cfg,
        "task_cfg": {
            "label_rate": 25.0,
            "sample_rate": 16000,
            "normalize": False,
            "enable_padding": False,
            "max_keep_size": None,
            "max_sample_size": 250000,
            "min_sample_size": 32000,
            "random_crop": True,
            "pad_audio": False,
        },
        "model_weight": state,
        "dictionaries_symbols": [["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(500)]],
    }
    paths.hubert.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, paths.hubert)
    torch.save(
        {
            "model_cfg": {"vocab_size": 500, "dim": config.embed_dim, "upstream_dim": upstream_dim},
            "model_weight": quantizer.encoder.state_dict(),
        },
        paths.hubert_quantizer,
    )


# -- pitch VQ-VAE -------------------------------------------------------------------------------


def _pitch_config(width: int, depth: int, emb: int) -> dict:
    """A config.yaml in the release's layout. The full-size values (width 32, depth 4,
    emb 128, dilation growth 3, 4 stride-2 downsamplings) are speech-resynthesis' F0
    VQ-VAE with Spirit LM's 2 input channels and 64 bins: ~0.2M parameters, 16 frames
    per code, as the release."""
    level = {
        "input_emb_width": 2,
        "output_emb_width": emb,
        "levels": 1,
        "downs_t": [4],
        "strides_t": [2],
        "width": width,
        "depth": depth,
        "m_conv": 1.0,
        "dilation_growth_rate": 3,
    }
    return {
        "features": "norm_f0_interp,vuv",
        "speaker_norm": False,
        "encoder_params": dict(level),
        "vq_params": {"l_bins": CODEBOOK_SIZE, "emb_width": emb, "mu": 0.99, "levels": 1},
        "decoder_params": dict(level),
    }


PITCH_TINY_CONFIG = _pitch_config(width=8, depth=2, emb=16)
PITCH_FULL_CONFIG = _pitch_config(width=32, depth=4, emb=128)


def write_pitch(
    paths: CheckpointPaths,
    variant: str = "expressive",
    seed: int = 0,
    size: str = "tiny",
    fcpe_weights: str | os.PathLike | None = None,
) -> Path:
    """A random pitch VQ-VAE (config.yaml + model.pt) in the release's format, ``size`` "tiny"
    or "full"; returns its directory. Random encoder/decoder; codebook rows drawn from the
    encoder's own latents on the bundled LibriSpeech clip, so that real speech maps to many
    different codes. Needs the FCPE weights (to pick those rows from real speech)."""
    config = {"tiny": PITCH_TINY_CONFIG, "full": PITCH_FULL_CONFIG}.get(size)
    if config is None:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PitchVQVAE(config).eval()
    reference = PitchTokenizer(load_fcpe(fcpe_weights), model, config)
    clip = load_audio(BUNDLED_CLIP)
    with torch.no_grad():
        latents = model.encode(reference.features(clip))[0]  # [T', emb]
    bins = int(config["vq_params"]["l_bins"])
    if latents.shape[0] < bins:  # the reference's _tile: repeat with a little noise
        repeats = -(-bins // latents.shape[0])
        latents = latents.repeat(repeats, 1)
        latents = latents + torch.randn(latents.shape, generator=generator) * (0.01 / math.sqrt(latents.shape[1]))
    rows = torch.randperm(latents.shape[0], generator=generator)[:bins]
    codebook = model.vq.level_blocks[0].k
    assert isinstance(codebook, torch.Tensor)
    codebook.copy_(latents[rows])

    paths.vqvae_dir.mkdir(parents=True, exist_ok=True)
    (paths.vqvae_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    torch.save({"model": {k: v.contiguous() for k, v in model.state_dict().items()}}, paths.vqvae_dir / MODEL_FILE)
    return paths.vqvae_dir


# -- style encoder ------------------------------------------------------------------------------


# The style encoder's shapes: tiny, and facebook/wav2vec2-base's (the release's)
_WAV2VEC2_SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "conv_dim",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "classifier_proj_size",
)  # fmt: skip
_WAV2VEC2_SHAPES = {
    "tiny": (64, 128, 2, 2, [32] * 7, 16, 4, 32),
    "full": (768, 3072, 12, 12, [512] * 7, 128, 16, 256),
}


def _wav2vec2_config(size: str) -> dict[str, Any]:
    """A style encoder config.json as released (a transformers Wav2Vec2 classifier)."""
    if size not in _WAV2VEC2_SHAPES:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    dims = dict(zip(_WAV2VEC2_SHAPE_KEYS, copy.deepcopy(_WAV2VEC2_SHAPES[size]), strict=True))
    return {
        "architectures": ["Wav2Vec2ForSequenceClassification"],
        "model_type": "wav2vec2",
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_bias": False,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "hidden_act": "gelu",
        "do_stable_layer_norm": False,
        "layer_norm_eps": 1e-5,
        "num_feat_extract_layers": 7,
        "feat_proj_dropout": 0.1,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "final_dropout": 0.0,
        "layerdrop": 0.1,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "mask_feature_prob": 0.0,
        "initializer_range": 0.02,
        "use_weighted_layer_sum": False,
        "id2label": {str(i): str(i) for i in range(100)},
        "label2id": {str(i): i for i in range(100)},
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        **dims,
    }


def write_style(paths: CheckpointPaths, variant: str = "expressive", seed: int = 0, size: str = "tiny") -> None:
    """Write random-weight ``config.json`` + ``pytorch_model.bin`` in the HF release format.

    ``size="full"`` gives wav2vec2-base's shapes (~95M parameters) for benchmarks.
    """
    # transformers (the dev extra) builds the release's layout; only this writer needs it
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = _wav2vec2_config(size)
    torch.manual_seed(seed)
    hf_model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config.from_dict(cfg)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial norms/biases so that they are exercised by the tests
        for name, p in hf_model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
    state = {_canonical_weight_norm(k): v.clone() for k, v in hf_model.state_dict().items()}

    # Random classifiers put every window on one style: centre the classifier on jittered
    # pooled vectors of the LibriSpeech clip (nearest-prototype argmax).
    model = StyleModel(*encoder_config_from_hf(cfg, Path("<tiny>")))
    model.load_state_dict({_HFNamed(model).names[k]: v for k, v in state.items() if k not in UNUSED_KEYS})
    with torch.no_grad():
        x = torch.from_numpy(load_audio(BUNDLED_CLIP))
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORM_EPS)
        hidden = model.projector(model.encoder(x[None])[0])
        windows = torch.cat(
            [
                hidden.split(WINDOW_FRAMES // 5)[i].mean(0, keepdim=True)
                for i in range(len(hidden.split(WINDOW_FRAMES // 5)))
            ]
        )
        picks = torch.randint(0, windows.shape[0], (100,), generator=generator)
        protos = windows[picks] + 0.3 * windows.std(0) * torch.randn(100, windows.shape[1], generator=generator)
        state["classifier.weight"] = protos.clone()
        state["classifier.bias"] = -0.5 * (protos * protos).sum(1)
    directory = paths.style_encoder_dir
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.save(state, directory / "pytorch_model.bin")


# -- unit HiFi-GAN vocoder ----------------------------------------------------------------------


TINY_SPEAKERS = ["ex01", "ex02", "ex03", "ex04"]
TINY_STYLES = [
    "read-default",
    "read-happy",
    "read-sad",
    "read-whisper",
    "read-confused",
    "read-enunciated",
    "read-laughing",
    "read-narration",
    "conv-default",
    "conv-happy",
]


def random_vocoder(config: VocoderConfig, seed: int = 0) -> UnitHiFiGAN:
    """A model with random weights scaled so that it makes audible (non-silent) audio and
    varied durations."""
    gen = torch.Generator().manual_seed(seed)
    model = UnitHiFiGAN(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight_g"):
                # Row norms near 1 keep activations at unit scale through the stack.
                param.copy_(0.6 + 0.6 * torch.rand(param.shape, generator=gen))
            elif name.endswith("weight_v") or name.endswith(".weight") and param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "ln" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        if model.dur_predictor is not None:
            proj = model.dur_predictor.proj
            proj.weight.mul_(0.4 / proj.weight.shape[1] ** 0.5)
            proj.bias.fill_(math.log(3.0))  # exp(logd) - 1 around 2 frames, spread over 1..4
    return model.eval()


def write_vocoder(paths: CheckpointPaths, variant: str = "base", seed: int = 0, size: str = "tiny") -> Path:
    """Write config.json, generator.pt, speakers.txt (+ styles.txt for Base) in the release's
    format; ``size`` is "tiny" (tests) or "full" (benchmarks). Returns the directory."""
    config = model_config(variant, size, num_speakers=len(TINY_SPEAKERS), num_styles=len(TINY_STYLES))
    model = random_vocoder(config, seed)
    directory = paths.hifigan_dir(variant)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    torch.save({"generator": {k: v.clone() for k, v in model.state_dict().items()}}, directory / "generator.pt")
    (directory / "speakers.txt").write_text("\n".join(TINY_SPEAKERS) + "\n")
    if config.multistyle:
        (directory / "styles.txt").write_text("\n".join(TINY_STYLES) + "\n")
    return directory


def full_size_vocoder(variant: str, seed: int = 0) -> UnitHiFiGAN:
    """A random-weight vocoder of the release's size (benchmarks: speed only)."""
    config = model_config(variant, "full", num_speakers=len(TINY_SPEAKERS), num_styles=len(TINY_STYLES))
    model = random_vocoder(config, seed)
    model.speakers = list(TINY_SPEAKERS)
    model.styles = list(TINY_STYLES) if config.multistyle else []
    return model
