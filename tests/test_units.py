"""Speech-unit protocol (spec sections 2, 3, 5, 7) against the spec's wording.

The brute-force references below are written from the spec's text, independently of
runtime/units.py: each token gets its time, then a plain sort; each frame looks up
pitch/style by scanning the token list.
"""

from itertools import pairwise

import numpy as np
import pytest

from spiritlm_edge.runtime.errors import ModelError, UnitsError
from spiritlm_edge.units import (
    MOST_COMMON_STYLES,
    OutputModality,
    PitchFallback,
    SpeechVocab,
    allowed_token_ids,
    build_prompt,
    common_style,
    count_hubert_units,
    does_end_with_speech_token,
    does_start_with_speech_token,
    find_prompt_last_speech_start_position,
    forbidden_token_ids,
    iter_unit_frames,
    last_pitch_code,
    split_speech_and_text,
    string_to_units,
    units_to_string,
)

# --- spec section 2 table, built the way a tokenizer lists its pieces --------------------


def release_pieces(expressive: bool) -> dict[str, int]:
    pieces = {f"<text{i}>": i for i in range(32000)}
    pieces.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    pieces["[Text]"] = 32000
    pieces["[Speech]"] = 32001
    pieces.update({f"[Hu{n}]": 32002 + n for n in range(501)})
    if expressive:
        pieces.update({f"[Pi{n}]": 32503 + n for n in range(64)})
        pieces.update({f"[St{n}]": 32567 + n for n in range(100)})
    return pieces


BASE = SpeechVocab.from_pieces(release_pieces(False), 32512)
EXPRESSIVE = SpeechVocab.from_pieces(release_pieces(True), 32768)


# --- brute force from the spec's wording --------------------------------------------------


def brute_units_to_string(hubert, pitch=None, style=None) -> str:
    pairs = []  # (time, stream order, token); style, pitch, hubert at equal times

    def add(values, rate, dedup, order, prefix):
        prev = None
        for i, v in enumerate(values):
            if not dedup or v != prev:
                pairs.append((i / rate, order, f"[{prefix}{v}]"))
            prev = v

    if style is not None:
        add(style, 1, False, 0, "St")
    if pitch is not None:
        add(pitch, 12.5, True, 1, "Pi")
    add(hubert, 24.99, True, 2, "Hu")
    return "".join(tok for _, _, tok in sorted(pairs, key=lambda p: (p[0], p[1])))


def brute_frames(tokens: list[tuple[str, int]], no_style_fallback: int | None):
    """Each Hu: latest Pi/St before it, else the first in the whole list, else fallback."""
    pitches = [n for kind, n in tokens if kind == "Pi"]
    styles = [n for kind, n in tokens if kind == "St"]
    frames = []
    for i, (kind, n) in enumerate(tokens):
        if kind != "Hu":
            continue
        before_p = [m for k, m in tokens[:i] if k == "Pi"]
        before_s = [m for k, m in tokens[:i] if k == "St"]
        p = before_p[-1] if before_p else (pitches[0] if pitches else None)
        if before_s:
            s = before_s[-1]
        elif styles:
            s = styles[0]
        elif pitches:
            s = no_style_fallback
        else:
            s = None
        frames.append((n, p, s))
    return frames


def tokens_of(s: str) -> list[tuple[str, int]]:
    import re

    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"\[(Hu|Pi|St)(\d+)\]", s)]


def random_streams(rng, seconds_max=6.0):
    """Stream lengths as the encoders give them: 25 Hz, 12.5 Hz, 1 Hz; runs of repeats."""
    n = int(rng.integers(0, int(25 * seconds_max)))

    def runs(length, high):
        out = []
        while len(out) < length:
            out += [int(rng.integers(0, high))] * int(rng.integers(1, 5))
        return out[:length]

    hubert = runs(n, 501)
    pitch = runs((n + 1) // 2, 64)
    style = runs(max(1, -(-n // 25)) if n else 0, 100)
    return hubert, pitch, style


# --- section 5: units -> string ------------------------------------------------------------


SPEC_UNITS = {"hubert": "78 42 81 159 316 259", "pitch": "13 13 3", "style": "81"}
SPEC_STRING = "[St81][Pi13][Hu78][Hu42][Hu81][Hu159][Pi3][Hu316][Hu259]"


def test_spec_example_exact():
    assert units_to_string(SPEC_UNITS, has_pitch=True, has_style=True) == SPEC_STRING
    as_lists = {k: [int(x) for x in v.split()] for k, v in SPEC_UNITS.items()}
    assert units_to_string(as_lists, True, True) == SPEC_STRING
    as_arrays = {k: np.array(v, dtype=np.int32) for k, v in as_lists.items()}
    assert units_to_string(as_arrays, True, True, vocab=EXPRESSIVE) == SPEC_STRING
    # Base: the Hubert stream alone, deduplicated
    assert units_to_string(SPEC_UNITS) == "[Hu78][Hu42][Hu81][Hu159][Hu316][Hu259]"
    assert units_to_string({"hubert": "5 5 5 7 5"}) == "[Hu5][Hu7][Hu5]"
    # style is not deduplicated
    assert units_to_string({"hubert": "1", "style": "4 4"}, has_style=True) == "[St4][Hu1][St4]"


def test_units_to_string_matches_brute_force_random():
    rng = np.random.default_rng(1234)
    for _ in range(150):
        hubert, pitch, style = random_streams(rng)
        units = {"hubert": " ".join(map(str, hubert)), "pitch": pitch, "style": np.array(style, dtype=np.int64)}
        assert units_to_string(units, True, True) == brute_units_to_string(hubert, pitch, style)
        assert units_to_string(units) == brute_units_to_string(hubert)


def test_units_to_string_float_ties_long_stream():
    # frame 2499 of Hubert vs pitch 1250 (t=100 s) and style 100: the exact float times decide
    hubert = list(np.arange(2600) % 7)
    pitch = list(np.arange(1300) % 5)
    style = list(np.arange(105) % 3)
    got = units_to_string({"hubert": hubert, "pitch": pitch, "style": style}, True, True)
    assert got == brute_units_to_string(hubert, pitch, style)


def test_units_to_string_errors():
    with pytest.raises(UnitsError, match="pitch"):
        units_to_string({"hubert": "1 2"}, has_pitch=True)
    with pytest.raises(UnitsError, match="'-3'"):
        units_to_string({"hubert": "1 -3"})
    with pytest.raises(UnitsError, match="float"):
        units_to_string({"hubert": np.array([1.0, 2.0])})
    with pytest.raises(UnitsError, match=r"\[Hu999\].*0\.\.500"):
        units_to_string({"hubert": "1 999"}, vocab=BASE)
    with pytest.raises(UnitsError, match=r"\[Pi64\]"):
        units_to_string({"hubert": "1", "pitch": "64", "style": "1"}, True, True, vocab=EXPRESSIVE)
    with pytest.raises(UnitsError, match="base"):
        units_to_string({"hubert": "1", "pitch": "3"}, has_pitch=True, vocab=BASE)


# --- section 5: string -> units, streaming ---------------------------------------------------


def test_spec_example_back_to_units():
    assert string_to_units(SPEC_STRING) == {
        "hubert": "78 42 81 159 316 259",
        "pitch": "13 13 13 13 3 3",
        "style": "81 81 81 81 81 81",
    }
    assert string_to_units("[Hu3][Hu3][Hu9]") == {"hubert": "3 3 9"}
    assert string_to_units("") == {"hubert": ""}
    # frames before the first pitch/style take the first one seen
    assert string_to_units("[Hu1][Pi5][Hu2][St7][Pi6][Hu3]") == {"hubert": "1 2 3", "pitch": "5 5 6", "style": "7 7 7"}
    # style without pitch: no pitch stream
    assert string_to_units("[Hu1][St2][Hu4]") == {"hubert": "1 4", "style": "2 2"}
    # whitespace between tokens is ignored
    assert string_to_units(" [Hu1]\n[Hu2] ") == {"hubert": "1 2"}


def test_pitch_without_style_draws_common_style_seeded():
    seen = set()
    for seed in range(40):
        units = string_to_units("[Pi3][Hu1][Hu2]", rng=seed)
        style = units["style"].split()
        assert len(style) == 2 and style[0] == style[1]
        seen.add(int(style[0]))
        assert string_to_units("[Pi3][Hu1][Hu2]", rng=np.random.default_rng(seed)) == units
        assert string_to_units("[Pi3][Hu1][Hu2]", rng=seed) == units
    assert seen == set(MOST_COMMON_STYLES)
    # no Hubert at all: keys as the reference (empty streams)
    assert string_to_units("[Pi3]", rng=0).keys() == {"hubert", "pitch", "style"}


def test_string_to_units_errors():
    with pytest.raises(UnitsError, match="character 5"):
        string_to_units("[Hu1]hello")
    with pytest.raises(UnitsError, match="ends inside a token"):
        string_to_units("[Hu1][Hu2")
    with pytest.raises(UnitsError, match=r"\[Hu999\]"):
        string_to_units("[Hu999]", vocab=BASE)
    with pytest.raises(UnitsError, match=r"\[St100\]"):
        list(iter_unit_frames(["[St100]"], vocab=EXPRESSIVE))
    with pytest.raises(UnitsError, match="Base"):
        string_to_units("[Hu1][Pi2]", variant="base")
    with pytest.raises(ModelError):
        string_to_units("[Hu1]", variant="base", vocab=EXPRESSIVE)
    with pytest.raises(UnitsError, match="rng"):
        string_to_units("[Pi1][Hu1]", rng="seed")


def random_token_string(rng) -> str:
    """Well-formed streams, and some odd ones (no style, no pitch, units first)."""
    hubert, pitch, style = random_streams(rng)
    mode = rng.integers(0, 5)
    if mode == 1:
        style = None
    elif mode == 2:
        pitch = None
    s = brute_units_to_string(hubert, pitch, style)
    if mode == 3 and s:  # move the first tokens to the end: frames wait for a later pitch/style
        toks = [f"[{k}{n}]" for k, n in tokens_of(s)]
        cut = int(rng.integers(0, len(toks)))
        s = "".join(toks[cut:] + toks[:cut])
    return s


def test_round_trip_and_streaming_match_brute_force():
    rng = np.random.default_rng(99)
    for _ in range(200):
        s = random_token_string(rng)
        toks = tokens_of(s)
        seed = int(rng.integers(0, 2**31))
        fallback = int(MOST_COMMON_STYLES[np.random.default_rng(seed).integers(3)])
        expected = brute_frames(toks, fallback)
        units = string_to_units(s, rng=seed, vocab=EXPRESSIVE)
        assert units["hubert"].split() == [str(f[0]) for f in expected]
        has_pitch = any(k == "Pi" for k, _ in toks)
        has_style = has_pitch or any(k == "St" for k, _ in toks)
        assert ("pitch" in units) == has_pitch and ("style" in units) == has_style
        if has_pitch:
            assert units["pitch"].split() == [str(f[1]) for f in expected]
        if has_style:
            assert units["style"].split() == [str(f[2]) for f in expected]

        # streaming: one token per item, random cuts, several tokens per item
        for items in (
            [f"[{k}{n}]" for k, n in toks],
            _random_cuts(s, rng),
        ):
            frames = list(iter_unit_frames(items, rng=seed))
            assert frames == expected


def _random_cuts(s: str, rng) -> list[str]:
    if not s:
        return []
    cuts = sorted(set(rng.integers(0, len(s), size=int(rng.integers(1, 12))).tolist()))
    bounds = [0] + cuts + [len(s)]
    return [s[a:b] for a, b in pairwise(bounds)]


def test_units_string_units_round_trip():
    # units -> string -> units: deduplicated Hubert, each frame with its time's pitch/style
    rng = np.random.default_rng(5)
    for _ in range(100):
        hubert, pitch, style = random_streams(rng)
        s = units_to_string({"hubert": hubert, "pitch": pitch, "style": style}, True, True)
        back = string_to_units(s, rng=0)
        expected = brute_frames(tokens_of(brute_units_to_string(hubert, pitch, style)), None)
        assert back.get("hubert", "").split() == [str(f[0]) for f in expected]
        if hubert:
            assert back["pitch"].split() == [str(f[1]) for f in expected]
            assert back["style"].split() == [str(f[2]) for f in expected]
        base = string_to_units(units_to_string({"hubert": hubert}), variant="base")
        deduped = [h for i, h in enumerate(hubert) if i == 0 or h != hubert[i - 1]]
        assert base == {"hubert": " ".join(map(str, deduped))}


class _Recorder:
    """Feeds items while recording how many frames came out after each one."""

    def __init__(self, items):
        self.items, self.log = items, []

    def __iter__(self):
        for item in self.items:
            self.log.append(item)
            yield item


def test_streaming_yields_as_soon_as_determined():
    # Base: every [Hu] at once
    src = _Recorder(["[Hu1]", "[Hu2]", "[Hu3]"])
    it = iter_unit_frames(src, vocab=BASE)
    assert next(it) == (1, None, None) and src.log == ["[Hu1]"]
    assert next(it) == (2, None, None) and len(src.log) == 2
    # Expressive: units before the first pitch and style wait for both, then stream freely
    src = _Recorder(["[Hu1]", "[Pi4]", "[Hu2]", "[St9]", "[Hu3]", "[Pi5]", "[Hu6]"])
    it = iter_unit_frames(src)
    assert next(it) == (1, 4, 9) and len(src.log) == 4  # released by [St9]
    assert next(it) == (2, 4, 9) and len(src.log) == 4
    assert next(it) == (3, 4, 9) and len(src.log) == 5
    assert next(it) == (6, 5, 9) and len(src.log) == 7
    # stream with pitch but no style: held to the end, then the seeded common style
    frames = list(iter_unit_frames(["[Pi1][Hu1]", "[Hu2]"], rng=3))
    assert frames == [(1, 1, s), (2, 1, s)] if (s := frames[0][2]) in MOST_COMMON_STYLES else False
    assert string_to_units("[Pi1][Hu1][Hu2]", rng=3)["style"] == f"{s} {s}"


# --- section 7: splitting generated output ------------------------------------------------------


@pytest.mark.parametrize(
    "content,expected",
    [
        (
            "abc[St1][Pi234][Hu123][Hu45][Text]hello world[",
            [("abc", "t"), ("[St1][Pi234][Hu123][Hu45]", "s"), ("hello world[", "t")],
        ),
        ("[St1][Pi2][Hu3][Hu45]", [("[St1][Pi2][Hu3][Hu45]", "s")]),
        ("abc", [("abc", "t")]),
        ("abc[]", [("abc[]", "t")]),
        ("[St1][Hu45][Text][abc", [("[St1][Hu45]", "s"), ("[abc", "t")]),
        ("abc[Text]def", [("abcdef", "t")]),
        ("[Hu1][Speech][Hu2]", [("[Hu1][Hu2]", "s")]),
        ("[Text]", []),
        ("", []),
        (
            "[Hu338][Text] and they went[Speech][Hu431][Pi0][Hu457][Text] shoes [",
            [("[Hu338]", "s"), (" and they went", "t"), ("[Hu431][Pi0][Hu457]", "s"), (" shoes [", "t")],
        ),
        ("[Hu1] [Hu2]", [("[Hu1]", "s"), (" ", "t"), ("[Hu2]", "s")]),
        ("[Human] [Hu12", [("[Human] [Hu12", "t")]),
        ("[[Hu7]]", [("[", "t"), ("[Hu7]", "s"), ("]", "t")]),
    ],
)
def test_split_speech_and_text(content, expected):
    assert split_speech_and_text(content) == expected
    # the chunks, minus the markers, put the string back together
    import re

    assert "".join(c for c, _ in split_speech_and_text(content)) == re.sub(r"\[(Text|Speech)\]", "", content)


def test_speech_token_edges():
    for s, start, end in [
        ("]]", False, False),
        ("[]", False, False),
        ("[[", False, False),
        ("[Hu100]", True, True),
        ("abc[]", False, False),
        ("[St1][Pi234][Hu123][Hu45][Text][abc]", True, False),
        ("abc[Text]def", False, False),
        ("[Pi9]", True, True),
        ("[St0]", True, True),
        ("[Text][Hu1]", False, True),
        ("", False, False),
        (None, False, False),
        ("[Hux]", False, False),
    ]:
        assert does_start_with_speech_token(s) is start, s
        assert does_end_with_speech_token(s) is end, s
    assert count_hubert_units("[St1][Hu2][Pi3][Hu4]x[Hu]") == 2


@pytest.mark.parametrize(
    "s,expected",
    [
        ("abc[Hu123][Hu456][Pi23][St2]", 3),
        ("[Hu123]abc[Hu123][Hu456][Pi23][St2]", 10),
        ("[Hu123][Hu456][Pi23][St2]", 0),
        ("abc", None),
        ("[Speech][St71][Pi39][Hu99][Text]x[Speech][Hu1][Pi2]", len("[Speech][St71][Pi39][Hu99][Text]x[Speech]")),
        ("[Hu1]abc", 0),
    ],
)
def test_find_prompt_last_speech_start_position(s, expected):
    assert find_prompt_last_speech_start_position(s) == expected


# --- section 3: prompts -------------------------------------------------------------------------


def test_build_prompt():
    u1, u2 = "[Hu1][Hu2]", "[St3][Pi4][Hu5]"
    assert build_prompt([("s", u1)], "text") == "[Speech][Hu1][Hu2][Text]"
    assert build_prompt([("SPEECH", u1)], OutputModality.SPEECH) == "[Speech][Hu1][Hu2]"
    assert build_prompt([("Text", "hello")], "speech") == "[Text]hello[Speech]"
    assert build_prompt([("t", "hello")], "TEXT") == "[Text]hello"
    assert build_prompt([("t", "hello")], "arbitrary") == "[Text]hello"
    assert build_prompt([], "text") == "[Text]"
    assert build_prompt([], "speech") == "[Speech]"
    assert build_prompt([], "arbitrary") == ""
    # prefix only when the modality changes
    assert build_prompt([("t", "a "), ("t", "b"), ("s", u1), ("s", u2), ("t", "c")], "arbitrary") == (
        "[Text]a b[Speech][Hu1][Hu2][St3][Pi4][Hu5][Text]c"
    )
    # few-shot ASR shape from the spec
    shots = [("s", u1), ("t", "one two\n"), ("s", u2)]
    assert build_prompt(shots, "text") == "[Speech][Hu1][Hu2][Text]one two\n[Speech][St3][Pi4][Hu5][Text]"

    class Item:  # duck-typed GenerationInput with an enum content type
        import enum

        content_type = enum.Enum("ContentType", "TEXT SPEECH").SPEECH
        content = u1

    assert build_prompt([Item()], "text") == "[Speech][Hu1][Hu2][Text]"


def test_build_prompt_errors():
    with pytest.raises(ModelError, match="output_modality"):
        build_prompt([], "audio")
    with pytest.raises(ModelError, match="content type"):
        build_prompt([("image", "x")], "text")
    with pytest.raises(UnitsError, match="not a speech unit"):
        build_prompt([("s", "hello")], "text")
    with pytest.raises(UnitsError, match=r"\[Hu501\]"):
        build_prompt([("s", "[Hu501]")], "text", vocab=BASE)
    with pytest.raises(ModelError, match="encode audio"):
        build_prompt([("s", np.zeros(3))], "text")
    with pytest.raises(ModelError, match="pair"):
        build_prompt(["hello"], "text")


def test_output_modality_parse():
    assert OutputModality.parse("text") is OutputModality.TEXT
    assert OutputModality.parse(" Speech ") is OutputModality.SPEECH
    assert OutputModality.parse(OutputModality.ARBITRARY) is OutputModality.ARBITRARY
    for bad in ("t", None, 1):
        with pytest.raises(ModelError):
            OutputModality.parse(bad)


# --- section 2: vocabulary and forced modality -----------------------------------------------------


def test_release_vocab_layout():
    assert BASE.variant == "base" and EXPRESSIVE.variant == "expressive"
    assert (BASE.n_text, BASE.text_id, BASE.speech_id, BASE.hubert_start, BASE.hubert_count) == (
        32000,
        32000,
        32001,
        32002,
        501,
    )
    assert BASE.n_real == 32503 and BASE.pitch_count == 0 and BASE.ids("pitch") == range(0)
    assert EXPRESSIVE.ids("pitch") == range(32503, 32567)
    assert EXPRESSIVE.ids("St") == range(32567, 32667) and EXPRESSIVE.n_real == 32667
    assert EXPRESSIVE.token_id("Hu", 500) == 32502 and EXPRESSIVE.token_id("style", 99) == 32666
    assert EXPRESSIVE.unit_of(32503) == ("pitch", 0) and EXPRESSIVE.unit_of(32001) is None
    assert BASE.unit_of(32503) is None
    assert EXPRESSIVE.is_speech_unit(32002) and not EXPRESSIVE.is_speech_unit(32001)
    assert not EXPRESSIVE.is_speech_unit(32667)
    with pytest.raises(UnitsError, match=r"\[Pi0\].*base"):
        BASE.token_id("pitch", 0)
    with pytest.raises(UnitsError, match="kind"):
        BASE.token_id("f0", 0)


def test_vocab_from_pieces_is_not_hard_coded():
    # a small vocabulary laid out like the release
    pieces = {f"p{i}": i for i in range(10)}
    pieces.update(
        {"[Text]": 10, "[Speech]": 11, "[Hu0]": 12, "[Hu1]": 13, "[Hu2]": 14, "[Pi0]": 15, "[Pi1]": 16, "[St0]": 17}
    )
    v = SpeechVocab.from_pieces(pieces, 20)
    assert (v.n_text, v.hubert_count, v.pitch_count, v.style_count, v.n_real) == (10, 3, 2, 1, 18)
    assert forbidden_token_ids(None, "text", v) == list(range(10, 20))
    assert forbidden_token_ids("expressive", "speech", v) == list(range(0, 12)) + [18, 19]
    assert allowed_token_ids(None, "speech", v) == list(range(12, 18))
    assert allowed_token_ids(None, "text", v) == list(range(10))
    assert allowed_token_ids(None, "arbitrary", v) == list(range(20))


@pytest.mark.parametrize(
    "edit,size,message",
    [
        (lambda p: p.pop("[Text]"), 32768, r"no '\[Text\]' piece"),
        (lambda p: p.update({"[Speech]": 32700}), 32768, r"\[Speech\] has id 32700, expected 32001"),
        (lambda p: p.pop("[Hu7]"), 32768, r"\[Hu7\] is missing"),
        (lambda p: p.update({"[Hu3]": 32006, "[Hu4]": 32005}), 32768, r"\[Hu3\] has id 32006, expected 32005"),
        (lambda p: [p.pop(f"[St{n}]") for n in range(100)], 32768, r"\[PiN\] pieces but no \[StN\]"),
        (lambda p: p.update({"[Pi5]": 40000}), 32768, r"\[Pi5\] has id 40000"),
        (lambda p: p.update({"hello": 32010}), 32768, r"'hello' has id 32010"),
        (lambda p: None, 32600, "32600 rows but the tokenizer needs 32667"),
        (lambda p: p.update({"<pad>": 40000}), 32768, "id 40000 but the embedding has only 32768"),
        (lambda p: [p.pop(k) for k in [k for k in p if k.startswith("[Hu")]], 32768, r"no \[HuN\]"),
    ],
)
def test_vocab_errors(edit, size, message):
    pieces = release_pieces(True)
    edit(pieces)
    with pytest.raises(UnitsError, match=message):
        SpeechVocab.from_pieces(pieces, size)


def test_vocab_allows_pieces_in_padding_rows():
    pieces = release_pieces(False)
    pieces.update({f"[PAD{i}]": i for i in range(32503, 32512)})
    assert SpeechVocab.from_pieces(pieces, 32512) == BASE


def test_forbidden_token_ids_spec_table():
    text_speech = [32000, 32001]
    hu = list(range(32002, 32503))
    pi, st = list(range(32503, 32567)), list(range(32567, 32667))
    # TEXT: the spec's set, plus padding rows past the last real piece
    assert forbidden_token_ids("base", "text", BASE) == text_speech + hu + list(range(32503, 32512))
    assert forbidden_token_ids("expressive", OutputModality.TEXT, EXPRESSIVE) == (
        text_speech + hu + pi + st + list(range(32667, 32768))
    )
    # SPEECH: every text id and the two markers (+ padding)
    assert forbidden_token_ids("base", "speech", BASE) == list(range(32000)) + text_speech + list(range(32503, 32512))
    assert forbidden_token_ids("expressive", "speech", EXPRESSIVE) == (
        list(range(32000)) + text_speech + list(range(32667, 32768))
    )
    assert allowed_token_ids("expressive", "speech", EXPRESSIVE) == hu + pi + st
    assert allowed_token_ids("base", "speech", BASE) == hu
    assert forbidden_token_ids("base", "arbitrary", BASE) == []
    assert forbidden_token_ids("expressive", "ARBITRARY", EXPRESSIVE) == []
    with pytest.raises(ModelError, match="does not match"):
        forbidden_token_ids("base", "text", EXPRESSIVE)
    with pytest.raises(ModelError, match="variant"):
        forbidden_token_ids("large", "text", EXPRESSIVE)


def test_public_names_importable_from_shim():
    import spiritlm_edge
    import spiritlm_edge.units as shim

    assert spiritlm_edge.OutputModality is shim.OutputModality
    for name in shim.__all__:
        assert hasattr(shim, name), name


# --- speech without pitch codes (spec section 5, issue 16) -----------------------------------


def test_last_pitch_code():
    assert last_pitch_code("[Text]hi[Speech][St3][Pi7][Hu1][Pi12][Hu2][Text]ok[Speech]") == 12
    assert last_pitch_code("[Speech][Hu1][Hu2]") is None
    assert last_pitch_code(None) is None and last_pitch_code("") is None
    assert last_pitch_code("[Pi 3][Pi]") is None  # not tokens


def test_pitch_fallback_rule_offline_and_streaming(caplog):
    string = "[Hu1][Hu2][St9][Hu3]"  # Hubert and style, no pitch at all
    assert string_to_units(string) == {"hubert": "1 2 3", "style": "9 9 9"}  # without a fallback: as before
    fallback = PitchFallback(7, "the test's code")
    with caplog.at_level("WARNING"):
        units = string_to_units(string, pitch_fallback=fallback)
        frames = list(iter_unit_frames(["[Hu1]", "[Hu2][St", "9]", "[Hu3]"], pitch_fallback=fallback))
    assert units == {"hubert": "1 2 3", "pitch": "7 7 7", "style": "9 9 9"}
    assert frames == [(1, 7, 9), (2, 7, 9), (3, 7, 9)]
    # one warning per fallback object (one turn), however many chunks use it
    assert caplog.text.count("has no pitch code") == 1 and "the test's code" in caplog.text
    # no style either: the pitch-but-no-style rule then draws a common style
    for seed in range(5):
        bare = string_to_units("[Hu4][Hu5]", rng=seed, pitch_fallback=fallback)
        assert bare["pitch"] == "7 7" and bare["style"] == string_to_units("[Pi7][Hu4][Hu5]", rng=seed)["style"]
    # a chunk with its own pitch code never uses the fallback
    unused = PitchFallback(7, "x")
    assert string_to_units("[Hu1][Pi3][Hu2]", rng=0, pitch_fallback=unused)["pitch"] == "3 3"
    assert not unused.used
    # no Hubert unit: nothing to speak, nothing filled in
    assert "pitch" not in string_to_units("[St2]", pitch_fallback=unused) and not unused.used
    with pytest.raises(ModelError, match="Base"):
        string_to_units("[Hu1]", variant="base", pitch_fallback=fallback)
    with pytest.raises(UnitsError, match="non-negative"):
        PitchFallback(-1, "x")


def test_pitch_fallback_for_prompt():
    continued = PitchFallback.for_prompt("[Speech][St3][Pi21][Hu1][Pi5][Hu9]", neutral_code=40)
    assert (continued.code, continued.source) == (5, "the prompt's last pitch code")
    neutral = PitchFallback.for_prompt("[Text]hello[Speech]", neutral_code=40)
    assert (neutral.code, neutral.source) == (40, "the bundle's neutral pitch code")


def test_common_style_is_the_reference_rule():
    assert {common_style(seed) for seed in range(40)} == set(MOST_COMMON_STYLES)
    assert common_style(np.random.default_rng(3)) == common_style(3)
