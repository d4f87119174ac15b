"""SpiritTokenizer against transformers' slow LlamaTokenizer (the reference's tokenizer),
for both ways of storing the speech tokens, on many random mixed text + speech prompts."""

import json
import random

import pytest

from spiritlm_edge.export.random_lm import write_tiny_tokenizer
from spiritlm_edge.runtime.errors import CheckpointError, UnitsError
from spiritlm_edge.runtime.tokenizer import SpiritTokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIGS = [
    ("pieces", "base"),
    ("pieces", "expressive"),
    ("added", "base"),
    ("added", "expressive"),
    ("added-flags", "expressive"),
]


def _write(tmp_path_factory, storage, variant):
    lm_dir = tmp_path_factory.mktemp(f"tok-{storage}-{variant}")
    write_tiny_tokenizer(lm_dir, variant, seed=3, storage="added" if storage.startswith("added") else storage)
    if storage == "added-flags":
        # stripping flags and a special speech token exercise transformers' added-token rules
        config = json.loads((lm_dir / "tokenizer_config.json").read_text())
        for entry in config["added_tokens_decoder"].values():
            if entry["content"] == "[Text]":
                entry["lstrip"] = True
            elif entry["content"] == "[Speech]":
                entry["rstrip"] = True
            elif entry["content"] == "[St5]":
                entry["special"] = True
            elif entry["content"] == "[Hu7]":
                entry["single_word"] = True
        config["clean_up_tokenization_spaces"] = True
        (lm_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return lm_dir


@pytest.fixture(scope="module", params=CONFIGS, ids=["-".join(c) for c in CONFIGS])
def pair(request, tmp_path_factory):
    storage, variant = request.param
    lm_dir = _write(tmp_path_factory, storage, variant)
    ours = SpiritTokenizer.from_dir(lm_dir, variant=variant)
    ref = transformers.LlamaTokenizer.from_pretrained(str(lm_dir), add_bos_token=True, add_eos_token=False)
    return ours, ref, variant


def random_prompt(rng: random.Random, variant: str) -> str:
    words = [
        "hello",
        "world",
        "the",
        "spirit",
        "café",
        "日本語",
        "naïve",
        "x",
        "42",
        "3.14",
        "!",
        "?",
        "[",
        "]",
        "[Hu",
        "Hu1]",
        "<s>",
        "</s>",
        "<unk>",
        "▁",
        "  ",
        "\n",
        "\t",
        " \n ",
        "é",
        "🙂",
    ]
    units = ["Hu"] + (["Pi", "St"] if variant == "expressive" else [])
    limits = {"Hu": 501, "Pi": 64, "St": 100}
    parts = []
    if rng.random() < 0.3:
        parts.append(rng.choice([" ", "  ", "\n"]))
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.35:
            n = rng.randint(1, 8)
            text = "".join(rng.choice(words) + rng.choice(["", " ", " ", "  ", "\n"]) for _ in range(n))
            parts.append(text)
        elif kind < 0.75:
            run = []
            for _ in range(rng.randint(1, 20)):
                prefix = rng.choice(units)
                run.append(f"[{prefix}{rng.randrange(limits[prefix])}]")
            parts.append("".join(run))
        else:
            parts.append(rng.choice(["[Text]", "[Speech]", "[Text] ", " [Speech]", "[Speech][Text]"]))
    if rng.random() < 0.3:
        parts.append(rng.choice([" ", "  ", "\n", "[Hu"]))
    return "".join(parts)


def test_encode_matches_reference_on_random_prompts(pair):
    ours, ref, variant = pair
    rng = random.Random(1234)
    for _ in range(400):
        prompt = random_prompt(rng, variant)
        assert ours.encode(prompt) == ref.encode(prompt), prompt


def test_encode_matches_reference_on_edge_cases(pair):
    ours, ref, _ = pair
    cases = [
        "",
        " ",
        "\n",
        "[Speech]",
        "[Text]",
        " [Speech][Hu0] ",
        "[Hu500][Hu500]",
        "[Hu501]",
        "[[Hu3]]",
        "[Hu3 ][Hu 3]",
        "a[Text]b",
        "<s>[Speech]</s>",
        "  leading and trailing  ",
        "[Text]hello\n[Speech][Hu1][Hu2]\n[Text]bye\n",
        "[Hu007]",
        "▁[Hu1]▁",
    ]
    for prompt in cases:
        assert ours.encode(prompt) == ref.encode(prompt), prompt


def test_decode_matches_reference(pair):
    ours, ref, variant = pair
    rng = random.Random(99)
    for _ in range(200):
        ids = ours.encode(random_prompt(rng, variant))
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
    # arbitrary id sequences (what a model may generate), specials and byte pieces included
    n = len(ours)
    for _ in range(200):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 30))]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids


def test_lone_dummy_prefix_before_speech_with_user_defined_pieces(tmp_path):
    write_tiny_tokenizer(tmp_path, "base", seed=3, storage="pieces")
    tok = SpiritTokenizer.from_dir(tmp_path, variant="base")
    ids = tok.encode("[Speech][Hu12]")
    assert ids == [tok.bos_id, tok.sp.piece_to_id("\u2581"), tok.vocab.speech_id, tok.vocab.hubert_start + 12]


def test_vocab_layout_follows_spec(pair):
    ours, _, variant = pair
    v = ours.vocab
    assert v.text_id == v.n_text == 1000  # right after the 1000 text pieces write_tiny_tokenizer trains
    assert v.speech_id == v.text_id + 1 and v.hubert_start == v.text_id + 2 and v.hubert_count == 501
    if variant == "expressive":
        assert (v.pitch_count, v.style_count) == (64, 100)
        assert v.style_start == v.pitch_start + 64
    else:
        assert v.pitch_count == v.style_count == 0
    assert (ours.bos_id, ours.eos_id) == (1, 2)


def test_encode_units_fast_path(pair):
    ours, _, variant = pair
    units = "[Hu5][Hu0][Hu500]" + ("[Pi3][St99]" if variant == "expressive" else "")
    fast = ours.encode_units(units)
    full = ours.encode("[Speech]" + units)
    assert full[-len(fast) :] == fast
    with pytest.raises(UnitsError, match="not in this model"):
        ours.encode_units("[Hu501]")
    with pytest.raises(UnitsError, match="not \\[HuN\\]"):
        ours.encode_units("[Hu1] hello")


def test_bad_tokenizer_files(tmp_path):
    write_tiny_tokenizer(tmp_path, "base", seed=3, storage="pieces")
    with pytest.raises(CheckpointError, match="Expressive"):
        SpiritTokenizer.from_dir(tmp_path, variant="expressive")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    with pytest.raises(CheckpointError, match="legacy"):
        SpiritTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SpiritTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        SpiritTokenizer.from_dir(tmp_path)


def test_tokenizer_without_speech_tokens_is_rejected(tmp_path):
    from spiritlm_edge.export.random_lm import train_tiny_sentencepiece

    write_tiny_tokenizer(tmp_path, "base", seed=3, storage="pieces")
    (tmp_path / "tokenizer.model").write_bytes(train_tiny_sentencepiece(3))  # plain text vocabulary
    with pytest.raises(CheckpointError, match=r"\[Text\]"):
        SpiritTokenizer.from_dir(tmp_path)


def test_decode_rejects_unknown_ids(pair):
    ours, _, _ = pair
    with pytest.raises(UnitsError, match="outside"):
        ours.decode([len(ours)])
