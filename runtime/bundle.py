"""A bundle: one directory of engines plus ``bundle.json``, like a piper voice.

``bundle.json`` is the only thing the runtime trusts. It records the variant, the
token rates and, for each component, its file with size and sha256, the ONNX opset and
the input/output names, and whatever the component needs at run time (hop sizes,
speaker and style lists, the LM quant type)::

    {
      "format": "spiritlm-edge-bundle", "format_version": 1,
      "variant": "expressive", "created_by": "spiritlm-edge 0.1.0",
      "sample_rate": 16000,
      "token_rates": {"hubert": 24.99, "pitch": 12.5, "style": 1.0},
      "components": {
        "hubert": {"file": "hubert.onnx", "bytes": 1234, "sha256": "...", "opset": 17, ...},
        "lm": {"file": "lm-Q4_K_M.gguf", "bytes": ..., "sha256": "...", "quant": "Q4_K_M"}
      }
    }

Exporters add components with :func:`add_component`; the runtime opens a bundle with
:class:`Bundle`, gets verified paths with :meth:`Bundle.path` and each speech engine's
settings, read once and typed, with :meth:`Bundle.config` (the dataclasses below, as
piper reads its voice config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from spiritlm_edge import __version__
from spiritlm_edge.runtime.errors import BundleError

log = logging.getLogger(__name__)

MANIFEST = "bundle.json"
FORMAT = "spiritlm-edge-bundle"
FORMAT_VERSION = 1
# Files above this size (the LM) are checked by size when opened and hashed only on
# request (`spiritlm-edge info --verify`): hashing 4 GB costs seconds at every start.
HASH_ON_OPEN_MAX_BYTES = 512 * 1024 * 1024
# Engine precisions a component may hold: its own file is fp32; int8 / fp16 files are
# recorded under the component's "variants". The runtime takes int8 when present (CPU:
# faster, gated for accuracy when written); this environment variable or the
# ``precision`` argument of :meth:`Bundle.engine_path` overrides that.
PRECISIONS = ("fp32", "int8", "fp16")
PRECISION_ENV = "SPIRITLM_EDGE_PRECISION"
DEFAULT_PRECISION_ORDER = ("int8", "fp32")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(bundle_dir: Path, path: Path) -> dict[str, Any]:
    """The manifest fields describing one file of the bundle."""
    path = Path(path)
    return {
        "file": path.relative_to(bundle_dir).as_posix(),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(
            f"Bundle directory {bundle_dir} does not exist. Build one with `spiritlm-edge build` "
            "(or `spiritlm-edge demo` for a tiny random-weight bundle)."
        )
    if not manifest_path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST}. Build one with `spiritlm-edge build`.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); rebuild the bundle.") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a spiritlm-edge manifest (format={manifest.get('format')!r}).")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {manifest['format_version']}; this spiritlm-edge "
            f"reads up to {FORMAT_VERSION}. Upgrade spiritlm-edge."
        )
    return manifest


def _write_manifest(bundle_dir: Path, manifest: dict) -> None:
    manifest["created_by"] = f"spiritlm-edge {__version__}"
    # Sorted keys and a fixed layout: re-running an export gives the same bytes.
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _open_or_new(bundle_dir: Path) -> dict:
    if (bundle_dir / MANIFEST).exists():
        return read_manifest(bundle_dir)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "components": {}}


def update_manifest(bundle_dir: str | os.PathLike, **top_level: Any) -> dict:
    """Set bundle-wide keys (variant, sample_rate, token_rates, ...), creating the manifest
    if needed. A variant that disagrees with the existing manifest is an error."""
    bundle_dir = Path(bundle_dir)
    manifest = _open_or_new(bundle_dir)
    variant = top_level.get("variant")
    if variant and manifest.get("variant") not in (None, variant):
        raise BundleError(
            f"{bundle_dir} holds a {manifest['variant']} bundle; refusing to write {variant} "
            "parts into it. Use another --out directory."
        )
    manifest.update(top_level)
    _write_manifest(bundle_dir, manifest)
    return manifest


def add_component(bundle_dir: str | os.PathLike, name: str, entry: dict[str, Any], **top_level: Any) -> dict:
    """Record (or replace) component ``name`` in the bundle's manifest, creating it if needed.

    ``entry`` must hold ``file`` (relative to the bundle); size and sha256 are computed
    here. ``top_level`` keys are set as by :func:`update_manifest`.
    """
    bundle_dir = Path(bundle_dir)
    manifest = update_manifest(bundle_dir, **top_level)
    full = dict(entry)
    full.update(file_entry(bundle_dir, bundle_dir / entry["file"]))
    manifest.setdefault("components", {})[name] = full
    _write_manifest(bundle_dir, manifest)
    return manifest


def add_variant(bundle_dir: str | os.PathLike, name: str, variant: str, entry: dict[str, Any]) -> dict:
    """Record (or replace) another precision of component ``name`` (e.g. "int8", "fp16")
    under ``components[name]["variants"][variant]``; size and sha256 are computed here.
    The component's own file stays the fp32 reference."""
    if variant not in PRECISIONS or variant == "fp32":
        raise BundleError(f"Unknown variant {variant!r} for {name!r}: expected one of {', '.join(PRECISIONS[1:])}.")
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if name not in manifest.get("components", {}):
        raise BundleError(f"Bundle {bundle_dir} has no {name!r} component to add a {variant} variant to.")
    full = dict(entry)
    full.update(file_entry(bundle_dir, bundle_dir / entry["file"]))
    manifest["components"][name].setdefault("variants", {})[variant] = full
    _write_manifest(bundle_dir, manifest)
    return manifest


# ----------------------------------------------------------------------------- component settings


def _require(name: str, entry: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise BundleError(
            f"bundle.json's {name!r} component lacks {', '.join(missing)}: it was made by another "
            "spiritlm-edge version. Rebuild the bundle (spiritlm-edge build)."
        )


def _pair(name: str, entry: Mapping[str, Any], key: str, first: str, second: str) -> tuple[int, int]:
    value = entry[key]
    if not (isinstance(value, Mapping) and first in value and second in value):
        raise BundleError(
            f"bundle.json's {name!r} component has {key}={value!r}; expected "
            f"{{{first!r}: n, {second!r}: n}}. Rebuild the bundle."
        )
    return int(value[first]), int(value[second])


@dataclass(frozen=True)
class EncoderConfig:
    """An "audio -> unit ids" graph (``hubert``: 25 Hz units, ``style``: 1 Hz styles)."""

    hop_samples: int  # audio samples per frame of the graph's feature extractor
    rate_hz: float  # ids per second of audio
    min_samples: int  # shortest chunk the graph encodes

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> EncoderConfig:
        _require(name, entry, ("hop_samples", "rate_hz", "min_samples"))
        return cls(int(entry["hop_samples"]), float(entry["rate_hz"]), int(entry["min_samples"]))


@dataclass(frozen=True)
class F0Config:
    """FCPE (``fcpe``): audio -> F0 and confidence, and the voicing rules applied after it."""

    sample_rate: int
    model_hop: int  # samples per FCPE frame
    frame_hop: int  # samples per F0 frame the VQ-VAE reads
    threshold: float  # confidence at or below which a frame is unvoiced
    f0_min: float
    f0_max: float
    interpolate_unvoiced: bool

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> F0Config:
        keys = ("sample_rate", "model_hop", "frame_hop", "threshold", "f0_min", "f0_max", "interpolate_unvoiced")
        _require(name, entry, keys)
        return cls(
            int(entry["sample_rate"]),
            int(entry["model_hop"]),
            int(entry["frame_hop"]),
            float(entry["threshold"]),
            float(entry["f0_min"]),
            float(entry["f0_max"]),
            bool(entry["interpolate_unvoiced"]),
        )


@dataclass(frozen=True)
class PitchConfig:
    """The pitch VQ-VAE (``pitch``): (F0, voicing) frames -> 12.5 Hz pitch codes."""

    normalize_f0: bool  # subtract the utterance's mean voiced F0 first ("norm_" features)
    frame_hop: int
    frames_per_code: int
    codebook_size: int
    # what speech without pitch codes is spoken with (spec section 5); None in bundles
    # exported before it was recorded: the engine computes it on load
    neutral_code: int | None

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> PitchConfig:
        _require(name, entry, ("normalize_f0", "frame_hop", "frames_per_code", "codebook_size"))
        neutral = entry.get("neutral_code")
        return cls(
            bool(entry["normalize_f0"]),
            int(entry["frame_hop"]),
            int(entry["frames_per_code"]),
            int(entry["codebook_size"]),
            None if neutral is None else int(neutral),
        )


@dataclass(frozen=True)
class VocoderConfig:
    """The unit HiFi-GAN generator (``vocoder``): per-frame codes -> audio."""

    inputs: tuple[str, ...]  # the graph's inputs: units, pitch, style_codes, speaker, style_id
    sample_rate: int
    hop_length: int  # audio samples per frame
    num_units: int
    num_pitch: int  # 0: no pitch input (Base)
    num_style_codes: int  # 0: no per-frame style input (Base)
    num_speakers: int
    num_styles: int  # global styles (Base)
    speakers: tuple[str, ...]
    styles: tuple[str, ...]
    default_style: int | None
    pitch_upsample: int  # unit frames per pitch code at the streams' own rates
    style_upsample: int
    context_frames: tuple[int, int]  # (left, right) receptive field in frames
    layout: str  # "blocked" (x86 CPU) or "plain"

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> VocoderConfig:
        _require(name, entry, ("inputs", "sample_rate", "hop_length", "num_units", "context_frames"))
        default_style = entry.get("default_style")
        return cls(
            inputs=tuple(entry["inputs"]),
            sample_rate=int(entry["sample_rate"]),
            hop_length=int(entry["hop_length"]),
            num_units=int(entry["num_units"]),
            num_pitch=int(entry.get("num_pitch", 0)),
            num_style_codes=int(entry.get("num_style_codes", 0)),
            num_speakers=int(entry.get("num_speakers", 0)),
            num_styles=int(entry.get("num_styles", 0)),
            speakers=tuple(entry.get("speakers", ())),
            styles=tuple(entry.get("styles", ())),
            default_style=None if default_style is None else int(default_style),
            pitch_upsample=int(entry.get("pitch_upsample", 0)),
            style_upsample=int(entry.get("style_upsample", 0)),
            context_frames=_pair(name, entry, "context_frames", "left", "right"),
            layout=str(entry.get("layout", "plain")),
        )


@dataclass(frozen=True)
class DurationConfig:
    """The vocoder's duration predictor (``vocoder_duration``): units -> frames per unit."""

    context_units: tuple[int, int]  # (left, right) receptive field in units

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> DurationConfig:
        _require(name, entry, ("context_units",))
        return cls(_pair(name, entry, "context_units", "left", "right"))


@dataclass(frozen=True)
class StreamingVocoderConfig:
    """The stateful streaming generator (``vocoder_stream``): the ``vocoder`` graph computed
    chunk by chunk, each convolution's left context carried between calls as state."""

    inputs: tuple[str, ...]  # per-frame and global inputs, as the ``vocoder`` graph's
    states: tuple[tuple[str, str, tuple[int, ...]], ...]  # (input, output, initial shape), in graph order
    flush_input: str  # zeros of length 0 while streaming, ``flush_length`` in the call that ends the stream
    flush_length: int
    delay_samples: int  # the audio lags the frames fed by this many samples
    min_first_frames: int  # fewest frames of a first call that does not end the stream
    layout: str

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> StreamingVocoderConfig:
        _require(name, entry, ("inputs", "states", "flush", "delay_samples", "min_first_frames"))
        flush = entry["flush"]
        try:
            states = tuple(
                (str(s["input"]), str(s["output"]), tuple(int(d) for d in s["shape"])) for s in entry["states"]
            )
            flush_input, flush_length = str(flush["input"]), int(flush["length"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(
                f"bundle.json's {name!r} component has malformed states or flush settings. Rebuild the bundle."
            ) from None
        return cls(
            inputs=tuple(entry["inputs"]),
            states=states,
            flush_input=flush_input,
            flush_length=flush_length,
            delay_samples=int(entry["delay_samples"]),
            min_first_frames=int(entry["min_first_frames"]),
            layout=str(entry.get("layout", "plain")),
        )


_Config = TypeVar(
    "_Config", EncoderConfig, F0Config, PitchConfig, VocoderConfig, DurationConfig, StreamingVocoderConfig
)
# component name -> the settings its engine reads
CONFIGS: dict[str, type] = {
    "hubert": EncoderConfig,
    "style": EncoderConfig,
    "fcpe": F0Config,
    "pitch": PitchConfig,
    "vocoder": VocoderConfig,
    "vocoder_duration": DurationConfig,
    "vocoder_stream": StreamingVocoderConfig,
}


class Bundle:
    """An opened bundle: its manifest, verified paths to its files, typed engine settings."""

    def __init__(self, bundle_dir: str | os.PathLike, verify: bool = True):
        self.dir = Path(bundle_dir)
        self.manifest = read_manifest(self.dir)
        self._verify = verify
        self._verified: set[str] = set()
        self._configs: dict[str, Any] = {}

    @property
    def variant(self) -> str:
        return self.manifest.get("variant", "base")

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("components", {})

    def has(self, name: str) -> bool:
        return name in self.components

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            raise BundleError(
                f"Bundle {self.dir} has no {name!r} component (it has: "
                f"{', '.join(self.components) or 'none'}). Rebuild it with `spiritlm-edge build`."
            )
        return self.components[name]

    def config(self, name: str, kind: type[_Config]) -> _Config:
        """The settings of component ``name`` as a ``kind`` (one of the dataclasses above),
        read from bundle.json once; a missing or malformed key raises ``BundleError``."""
        if CONFIGS.get(name) is not kind:
            raise BundleError(f"component {name!r} has no {kind.__name__} settings")
        if name not in self._configs:
            self._configs[name] = kind.from_entry(name, self.component(name))
        return self._configs[name]

    def path(self, name: str, full_hash: bool | None = None) -> Path:
        """Path of component ``name``'s file, checked against the manifest."""
        return self._checked_path(name, self.component(name), name, full_hash)

    def variants(self, name: str) -> dict[str, dict[str, Any]]:
        """The extra precisions ("int8", "fp16") recorded for component ``name``."""
        return self.component(name).get("variants", {})

    def precision_of(self, name: str, precision: str | None = None) -> str:
        """Which precision :meth:`engine_path` opens for ``name``: ``precision`` if given,
        else $SPIRITLM_EDGE_PRECISION, else int8 when the bundle has it; a requested
        precision the component lacks falls back to fp32 (the variable applies to all
        components, and only some have variants)."""
        wanted = precision or os.environ.get(PRECISION_ENV, "").strip().lower() or None
        if wanted not in (None, "auto") + PRECISIONS:
            raise BundleError(
                f"Unknown precision {wanted!r} (from {'the precision argument' if precision else PRECISION_ENV}); "
                f"use one of {', '.join(PRECISIONS)} or auto."
            )
        have = self.variants(name)
        if wanted in (None, "auto"):
            return next(p for p in DEFAULT_PRECISION_ORDER if p == "fp32" or p in have)
        return wanted if wanted == "fp32" or wanted in have else "fp32"

    def engine_path(self, name: str, precision: str | None = None) -> Path:
        """Verified path of the file an engine should open for component ``name``: its int8
        or fp16 variant or the fp32 file, as :meth:`precision_of` decides."""
        chosen = self.precision_of(name, precision)
        if chosen == "fp32":
            return self.path(name)
        entry = self.variants(name)[chosen]
        gate = entry.get("gate", {})
        if gate and not gate.get("passed", True) and f"{name}:{chosen}" not in self._verified:
            log.warning(
                "%s's %s variant failed its accuracy gate and was written with --force; "
                "set %s=fp32 to use the fp32 engine.",
                name,
                chosen,
                PRECISION_ENV,
            )
        return self._checked_path(f"{name}:{chosen}", entry, f"{name} ({chosen})")

    def _checked_path(self, key: str, entry: dict[str, Any], name: str, full_hash: bool | None = None) -> Path:
        path = self.dir / entry["file"]
        if not path.is_file():
            raise BundleError(
                f"Bundle {self.dir} is missing {entry['file']} (component {name!r}). "
                "Copy the whole bundle directory, or rebuild it."
            )
        if self._verify and key not in self._verified:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(
                    f"{path} has {size} bytes but bundle.json says {entry['bytes']}: the file is "
                    "truncated or was replaced. Copy it again or rebuild the bundle."
                )
            if full_hash or (full_hash is None and size <= HASH_ON_OPEN_MAX_BYTES):
                if sha256_file(path) != entry["sha256"]:
                    raise BundleError(
                        f"{path} does not match the sha256 recorded in bundle.json: the file is "
                        "corrupted or was replaced. Copy it again or rebuild the bundle."
                    )
            self._verified.add(key)
        return path

    def verify_all(self) -> None:
        """Hash every file (large ones included)."""
        for name in self.components:
            self._verified.discard(name)
            self.path(name, full_hash=True)
            for precision, entry in self.variants(name).items():
                key = f"{name}:{precision}"
                self._verified.discard(key)
                self._checked_path(key, entry, f"{name} ({precision})", full_hash=True)
