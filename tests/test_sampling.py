"""SamplingConfig (runtime/sampling.py): the reference's defaults, the reading of a
transformers GenerationConfig, clear errors, and the distribution llama.cpp's sampler
chain draws from compared with transformers' logits processors on the same logits."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from spiritlm_edge.runtime.errors import ModelError
from spiritlm_edge.runtime.lm import LanguageModel
from spiritlm_edge.runtime.sampling import CLI_SAMPLING, DEFAULT_SAMPLING, SamplingConfig

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def test_defaults_are_transformers_generation_config_defaults():
    hf = transformers.GenerationConfig()
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        assert getattr(DEFAULT_SAMPLING, name) == getattr(hf, name), name
    assert DEFAULT_SAMPLING.greedy and not CLI_SAMPLING.greedy
    assert DEFAULT_SAMPLING.max_new_tokens == 200


def test_readme_states_the_cli_defaults():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flag, value in [
        ("--temperature", CLI_SAMPLING.temperature),
        ("--top-p", CLI_SAMPLING.top_p),
        ("--top-k", CLI_SAMPLING.top_k),
        ("--max-new-tokens", CLI_SAMPLING.max_new_tokens),
    ]:
        assert f"`{flag}` ({value})" in readme, flag


def test_generation_config_is_read_like_the_reference():
    gc = transformers.GenerationConfig(temperature=0.9, top_p=0.95, max_new_tokens=120, do_sample=True)
    config = SamplingConfig.from_generation_config(gc)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == (
        True,
        0.9,
        0.95,
        50,
        120,
    )
    # keyword arguments override the config, as in the reference
    assert SamplingConfig.from_generation_config(gc, top_k=5, temperature=0.5).as_dict() == {
        **config.as_dict(),
        "top_k": 5,
        "temperature": 0.5,
    }
    # a dict or any object with the attribute names does the same, without transformers
    assert (
        SamplingConfig.from_generation_config(
            {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 120, "do_sample": True}
        )
        == config
    )
    namespace = types.SimpleNamespace(temperature=0.9, top_p=0.95, max_new_tokens=120, do_sample=True, num_beams=1)
    assert SamplingConfig.from_generation_config(namespace) == config
    # options without effect on one sequence are accepted
    assert SamplingConfig.from_generation_config(gc, pad_token_id=-1, use_cache=True, num_beams=1) == config


def test_max_length_counts_the_prompt():
    config = SamplingConfig.from_generation_config(transformers.GenerationConfig(max_length=50))
    assert config.max_new_tokens is None and config.new_token_limit(30) == 20 and config.new_token_limit(60) == 0
    assert DEFAULT_SAMPLING.updated(max_length=50, max_new_tokens=7).new_token_limit(30) == 7


def test_options_that_cannot_be_honoured_are_refused_by_name():
    with pytest.raises(ModelError, match=r"min_p=0\.1.*num_beams=4"):
        SamplingConfig.from_generation_config(transformers.GenerationConfig(num_beams=4, min_p=0.1))
    with pytest.raises(ModelError, match="no_repeat_ngram_size"):
        SamplingConfig.from_generation_config(None, no_repeat_ngram_size=3)
    with pytest.raises(ModelError, match="colour"):
        SamplingConfig.from_generation_config({"colour": "blue"})


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": None}, "max_new_tokens"),
        ({"beam": 3}, "beam"),
    ],
)
def test_bad_values_give_clear_errors(options, name):
    with pytest.raises(ModelError, match=name):
        DEFAULT_SAMPLING.updated(**options)


def test_numbers_are_normalised():
    config = SamplingConfig(temperature=1, top_k=np.int64(7), seed=np.int32(3))
    assert type(config.temperature) is float and type(config.top_k) is int and type(config.seed) is int


# -- the distribution llama.cpp samples from, against transformers' processors -----------------


@pytest.fixture(scope="module")
def lm(tiny_base_bundle):
    model = LanguageModel.from_bundle(tiny_base_bundle, n_threads=2, n_ctx=256)
    yield model
    model.close()


def _transformers_distribution(logits, config: SamplingConfig, banned, history) -> np.ndarray:
    """transformers' processors, in the order its generate() builds them."""
    input_ids = torch.tensor([list(history) or [1]])
    processors = []
    if config.repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if banned:
        processors.append(lp.NoBadWordsLogitsProcessor([[t] for t in banned], eos_token_id=None))
    if config.do_sample:
        if config.temperature != 1.0:
            processors.append(lp.TemperatureLogitsWarper(config.temperature))
        if config.top_k != 0:
            processors.append(lp.TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(lp.TopPLogitsWarper(config.top_p))
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    for processor in processors:
        scores = processor(input_ids, scores)
    if not config.do_sample:
        one_hot = np.zeros(scores.shape[-1])
        one_hot[int(scores.argmax())] = 1.0
        return one_hot
    return torch.softmax(scores.double(), -1)[0].numpy()


CONFIGS = [
    SamplingConfig(),  # greedy
    SamplingConfig(do_sample=True),  # transformers' sampling defaults: T 1.0, top-k 50, top-p 1.0
    SamplingConfig(do_sample=True, temperature=0.9, top_p=0.95),
    SamplingConfig(do_sample=True, temperature=0.7, top_k=0, top_p=0.8),
    SamplingConfig(do_sample=True, temperature=1.5, top_k=5),
    SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
    SamplingConfig(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3),
    SamplingConfig(repetition_penalty=1.3),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.do_sample}-{c.temperature}-{c.top_k}-{c.top_p}-{c.repetition_penalty}"
)
@pytest.mark.parametrize("modality", ["ARBITRARY", "TEXT", "SPEECH"])
@pytest.mark.parametrize("scale", [1.0, 8.0])  # the tiny LM's own logits, and sharpened ones
def test_sampler_chain_distribution_matches_transformers(lm, config, modality, scale):
    history = lm.tokenizer.encode("[Text]the spirit of the[Speech][Hu12][Hu400][Hu3][Hu3][Text] text text")
    lm.prefill(history)
    logits = lm.logits() * scale
    ours = lm.next_token_distribution(logits, config, output_modality=modality, history=history)
    theirs = _transformers_distribution(logits, config, lm.banned_ids(modality), history)
    assert ours.shape == theirs.shape == (lm.n_vocab,)
    # the same tokens filtered out (exactly 0; a kept token's weight may underflow in float32)
    assert not ours[theirs == 0].any()
    assert (ours[theirs > 1e-6] > 0).all()
    np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=1e-4)


def test_generate_draws_from_that_distribution(lm):
    ids = lm.tokenizer.encode("[Text]the spirit of the")
    lm.prefill(ids)
    config = SamplingConfig(do_sample=True, top_k=3, max_new_tokens=1)
    support = np.flatnonzero(lm.next_token_distribution(lm.logits(), config, history=ids))
    assert len(support) == 3
    drawn = {lm.generate_ids(ids, sampling=config.updated(seed=seed))[0] for seed in range(40)}
    assert drawn <= set(support) and len(drawn) > 1


def test_repetition_penalty_counts_the_whole_context(tiny_base_bundle):
    """transformers penalises every token of its input, however far back: so must the chain,
    even for a context longer than the vocabulary."""
    with LanguageModel.from_bundle(tiny_base_bundle, n_threads=2, n_ctx=2048) as long_lm:
        rng = np.random.default_rng(0)
        history = [1, 500] + rng.integers(600, 700, 1800).tolist()  # token 500 only at the very start
        assert len(history) > long_lm.n_vocab
        logits = rng.normal(size=long_lm.n_vocab).astype(np.float32) * 3
        logits[500] = 8.0
        config = SamplingConfig(do_sample=True, top_k=0, repetition_penalty=2.0)
        ours = long_lm.next_token_distribution(logits, config, history=history)
        theirs = _transformers_distribution(logits, config, long_lm.banned_ids("ARBITRARY"), history)
        np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=1e-4)
