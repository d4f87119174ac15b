"""``SamplingConfig``: how the LM picks each next token, defined once.

Everything that generates consumes one: ``SpiritLM.generate`` / ``generate_stream``,
``Conversation``, ``LanguageModel.generate``, the CLI, the benchmark and the server.

``SamplingConfig()`` is the reference's behaviour: transformers' ``GenerationConfig``
defaults, i.e. greedy, and with ``do_sample=True`` temperature 1.0, top-k 50, top-p 1.0.
One deliberate difference: the reference leaves the length to transformers' ``max_length``
of 20 tokens *in all* (prompt included), which a speech prompt always exceeds, so ours
asks for ``DEFAULT_MAX_NEW_TOKENS`` new tokens unless ``max_length`` is given.

The drop-in API also reads the reference's ``generation_config=`` (a transformers
``GenerationConfig``, a dict or any object with those attribute names) through
:meth:`SamplingConfig.from_generation_config`: the options llama.cpp's sampler chain
reproduces are honoured, options without effect on one sequence are ignored, and any
other option set away from its neutral value is refused by name. transformers is never
imported here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from spiritlm_edge.runtime.errors import ModelError

# A second of speech is 25 Hubert units: a few seconds of answer.
DEFAULT_MAX_NEW_TOKENS = 200


@dataclass(frozen=True)
class SamplingConfig:
    """Next-token selection: greedy, or a draw after repetition penalty, temperature,
    top-k and top-p, in transformers' order.

    ``max_new_tokens`` caps the answer; when it is None, ``max_length`` caps prompt plus
    answer (transformers' rule). ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p``
    1.0 turn those filters off. ``seed`` makes a draw reproducible (None: a fresh one).
    """

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ModelError(f"do_sample must be True or False, got {self.do_sample!r}.")
        self._set("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, minimum=0, optional=True))
        self._set("max_length", _integer("max_length", self.max_length, minimum=1, optional=True))
        self._set("top_k", _integer("top_k", self.top_k, minimum=0))
        self._set("seed", _integer("seed", self.seed, optional=True))
        self._set("temperature", _real("temperature", self.temperature, ">= 0", lambda x: x >= 0))
        self._set("top_p", _real("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1))
        self._set("repetition_penalty", _real("repetition_penalty", self.repetition_penalty, "> 0", lambda x: x > 0))
        if self.max_new_tokens is None and self.max_length is None:
            raise ModelError("Give max_new_tokens (or max_length): there is no limit to the answer's length.")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalised types on a frozen instance

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def updated(self, **options: Any) -> SamplingConfig:
        """A copy with ``options`` (names of this class's fields) changed, validated.

        Setting ``max_length`` without ``max_new_tokens`` makes ``max_length`` the limit.
        """
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise ModelError(
                f"Unknown sampling option(s) {', '.join(unknown)}; supported: {', '.join(SAMPLING_OPTIONS)}."
            )
        if "max_length" in options and "max_new_tokens" not in options:
            options["max_new_tokens"] = None
        return replace(self, **options)

    def new_token_limit(self, prompt_tokens: int) -> int:
        """How many tokens may be generated after a prompt of ``prompt_tokens`` tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        assert self.max_length is not None  # __post_init__ guarantees one of them
        return max(0, self.max_length - prompt_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_OPTIONS}

    @classmethod
    def from_generation_config(
        cls, generation_config: Any = None, base: SamplingConfig | None = None, **options: Any
    ) -> SamplingConfig:
        """The reference's ``generate(generation_config=..., **kwargs)`` as a SamplingConfig.

        ``generation_config``: None, a SamplingConfig, a transformers ``GenerationConfig``
        (its settings that differ from transformers' defaults are read), a mapping, or any
        object with ``GenerationConfig`` attribute names. ``options`` override it, as the
        reference's keyword arguments do. Settings start from ``base`` (default:
        ``SamplingConfig()``).
        """
        config = base if base is not None else DEFAULT_SAMPLING
        if isinstance(generation_config, SamplingConfig):
            config, settings = generation_config, {}
        else:
            settings = _generation_settings(generation_config)
        settings.update(options)
        honoured: dict[str, Any] = {}
        unknown, refused = [], []
        for name, value in settings.items():
            if name in SAMPLING_OPTIONS:
                honoured[name] = _OFF_WHEN_NONE.get(name, value) if value is None else value
            elif name in _IGNORED:
                continue
            elif name in _NEUTRAL:
                if not _is_neutral(value, _NEUTRAL[name]):
                    refused.append(f"{name}={value!r}")
            else:
                unknown.append(name)
        if unknown:
            raise ModelError(
                f"Unknown generation option(s) {', '.join(sorted(unknown))}: not options of transformers' "
                f"GenerationConfig that spiritlm-edge knows. It honours {', '.join(SAMPLING_OPTIONS)}."
            )
        if refused:
            raise ModelError(
                f"Generation option(s) {', '.join(sorted(refused))} cannot be honoured: spiritlm-edge generates "
                f"one sequence with llama.cpp's sampler chain and honours {', '.join(SAMPLING_OPTIONS)}. "
                "Remove them (or set them to transformers' defaults)."
            )
        return config.updated(**honoured)


SAMPLING_OPTIONS = tuple(f.name for f in fields(SamplingConfig))

# GenerationConfig attributes that are None in some saved configs; None there means "off".
_OFF_WHEN_NONE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "do_sample": False}
# GenerationConfig attributes without effect on one greedy or sampled sequence from our engine
# (output formats, caches, ids that only matter for batches or beams).
_IGNORED = frozenset(
    {
        "pad_token_id",
        "bos_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "return_legacy_cache",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "low_memory",
        "compile_config",
        "disable_compile",
        "transformers_version",
        "length_penalty",
        "early_stopping",
        "prefill_chunk_size",
        "generation_kwargs",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "is_assistant",
    }
)
# GenerationConfig attributes we cannot honour, with the values at which they do nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "min_length": (0, None),
    "min_new_tokens": (None, 0),
    "max_time": (None,),
    "stop_strings": (None,),
    "num_beams": (1, None),
    "num_beam_groups": (1, None),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "min_p": (None, 0.0),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "top_h": (None,),
    "diversity_penalty": (0.0, None),
    "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None),
    "encoder_no_repeat_ngram_size": (0, None),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "renormalize_logits": (False,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (False,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_decoder_ids": (None,),
    "sequence_bias": (None,),
    "token_healing": (False,),
    "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,),
    "num_return_sequences": (1, None),
    "decoder_start_token_id": (None,),
    "prompt_lookup_num_tokens": (None,),
    "max_matching_ngram_size": (None,),
    "assistant_early_exit": (None,),
    # Llama's end-of-sequence id is 2, as in Spirit LM's own generation_config.json
    "eos_token_id": (None, 2, [2]),
}


def _generation_settings(generation_config: Any) -> dict[str, Any]:
    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    to_diff_dict = getattr(generation_config, "to_diff_dict", None)
    if callable(to_diff_dict):  # transformers' GenerationConfig: the settings that differ from its defaults
        return {name: value for name, value in to_diff_dict().items() if not name.startswith("_")}
    names = SAMPLING_OPTIONS + tuple(_NEUTRAL)
    return {name: getattr(generation_config, name) for name in names if hasattr(generation_config, name)}


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    try:
        return any(value is n or bool(value == n) for n in neutral)
    except (TypeError, ValueError):  # e.g. an array, whose comparison has no single truth value
        return False


def _integer(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ModelError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _real(name: str, value: Any, rule: str, ok: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ModelError(f"{name} must be a finite number {rule}, got {value!r}.")
    if not ok(value):
        raise ModelError(f"{name} must be {rule}, got {value}.")
    return float(value)


DEFAULT_SAMPLING = SamplingConfig()
# The CLI samples by default, with the settings of the reference's own example
# (temperature 0.9, top-p 0.95, transformers' top-k 50): a spoken answer that does not loop.
CLI_SAMPLING = SamplingConfig(do_sample=True, temperature=0.9, top_p=0.95)
