"""Encoding and prefilling a turn while it is spoken: StreamingEncoder (runtime/speech.py),
Listening (runtime/pipeline.py), the live loop and the server with it, and the agreement
command (bench/agreement.py). Tiny random bundles; the window arithmetic is checked against
direct engine calls, the joined prompt against units_to_string, answers against the
whole-prompt path."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.errors import AudioError, ModelError, UnitsError
from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
from spiritlm_edge.runtime.pipeline import PREFILL_SLICE_TOKENS, Conversation
from spiritlm_edge.runtime.speech import StreamingEncoder, StreamingWindow
from spiritlm_edge.runtime.units import build_prompt, units_to_string

UNIT_RE = re.compile(r"\[(Hu|Pi|St)(\d+)\]")


def _model(request, variant):
    return request.getfixturevalue(variant)


# --------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("variant", ["base", "expressive"])
def test_a_turn_shorter_than_a_step_is_encoded_exactly_as_whole(request, variant, clip):
    speech = _model(request, variant).speech_tokenizer
    encoder = StreamingEncoder(speech)
    short = clip[: encoder.step + encoder.lookahead - 1]
    assert encoder.advance(short) == ""  # no chunk has its look-ahead yet
    assert encoder.finish(short) == speech.encode_string(short)
    # and a whole recording handed over at its end is the whole-turn encoding too
    assert StreamingEncoder(speech).finish(clip) == speech.encode_string(clip)


@pytest.mark.parametrize("variant", ["base", "expressive"])
def test_chunks_are_their_windows_codes_and_the_prompt_is_their_join(request, variant, clip):
    """Every chunk [b0, b1) holds the codes that a direct engine call on its window
    [b0 - left, b1 + look-ahead) gives for its frames; the returned tokens join into
    units_to_string of all final codes (deduplicated across seams), each piece extending the last."""
    speech = _model(request, variant).speech_tokenizer
    window = StreamingWindow(left_s=1.0, step_s=0.5, lookahead_s=0.3)
    encoder = StreamingEncoder(speech, window)
    engines = {"hubert": speech.hubert, "pitch": speech.pitch, "style": speech.style}
    expected: dict[str, list[int]] = {name: [] for name in encoder.engines}
    pieces, boundaries = [], [0]
    for arrived in range(0, len(clip) + 1, 2400):  # 150 ms blocks, as a microphone would give
        before = encoder.final_samples
        pieces.append(encoder.advance(clip[:arrived]))
        after = encoder.final_samples
        if after == before:
            continue
        assert after % encoder.align == 0 and after + encoder.lookahead <= arrived
        origin = max(0, before - encoder.left)
        for name in encoder.engines:
            hop = encoder.hops[name]
            codes = engines[name](clip[origin : after + encoder.lookahead])
            expected[name] += codes[(before - origin) // hop : (after - origin) // hop].tolist()
        boundaries.append(after)
    assert len(boundaries) > 3  # several seams
    assert [encoder.codes[name] for name in encoder.engines] == [expected[name] for name in encoder.engines]
    pieces.append(encoder.finish(clip))
    joined = "".join(pieces)
    assert joined == encoder.text
    assert joined == units_to_string(encoder.codes, has_pitch=speech.has_pitch, has_style=speech.has_style)
    # dedup across seams: no Hubert unit token repeats the previous Hubert token
    hubert = [int(n) for kind, n in UNIT_RE.findall(joined) if kind == "Hu"]
    assert all(a != b for a, b in zip(hubert, hubert[1:], strict=False))
    # as many frames as the whole-turn encoding: nothing lost or doubled at the seams
    whole = speech.encode_units(clip)
    assert {k: len(v) for k, v in encoder.codes.items()} == {k: len(v.split()) for k, v in whole.items()}


def test_expressive_chunks_align_to_every_stream(expressive):
    encoder = StreamingEncoder(expressive.speech_tokenizer, StreamingWindow(0.3, 0.3, 0.1))
    # 40 ms Hubert frames, 80 ms pitch codes, 1 s style codes: boundaries every 2 s
    assert encoder.hops == {"hubert": 640, "pitch": 1280, "style": 16000}
    assert encoder.align == 32000 and encoder.step == 32000 and encoder.left == 32000


def test_falling_behind_encodes_several_steps_in_one_window(base, clip):
    encoder = StreamingEncoder(base.speech_tokenizer)
    encoder.advance(clip[: 5 * SAMPLE_RATE])
    assert encoder.windows == 1 and encoder.final_samples == 4 * encoder.step
    encoder.finish(clip)
    assert encoder.text == units_to_string(encoder.codes)


def test_encoder_misuse_is_refused(base, clip):
    for bad in ({"left_s": -1}, {"step_s": 0}, {"lookahead_s": float("nan")}, {"left_s": "1"}):
        with pytest.raises(AudioError, match="StreamingWindow"):
            StreamingWindow(**bad)
    encoder = StreamingEncoder(base.speech_tokenizer)
    encoder.advance(clip)
    with pytest.raises(AudioError, match="shorter than what was already encoded"):
        encoder.finish(clip[: encoder.final_samples - 1])
    encoder.finish(clip)
    with pytest.raises(AudioError, match="finished its turn"):
        encoder.advance(clip)


def test_generate_takes_the_speech_encoding(base, clip):
    whole = base.build_prompt([("SPEECH", clip)])
    streamed = base.build_prompt([("SPEECH", clip)], speech_encoding="streaming")
    assert whole == "[Speech]" + base.speech_tokenizer.encode_string(clip)
    assert streamed == "[Speech]" + StreamingEncoder(base.speech_tokenizer).encode_string(clip)
    assert whole != streamed  # random weights: the windows do change units
    with pytest.raises(ModelError, match="speech_encoding must be one of whole, streaming"):
        base.generate([("SPEECH", clip)], speech_encoding="chunked")


# --------------------------------------------------------------------------- Listening


def _speak(listening, audio, block=512, settle_every=None):
    """Feed ``audio`` in blocks; with ``settle_every``, let the worker catch up that often
    (a turn spoken at the speed the encoder keeps up with)."""
    for i, start in enumerate(range(0, len(audio), block)):
        listening.feed(audio[start : start + block])
        if settle_every and i % settle_every == 0:
            assert listening.settle(30)
    assert listening.settle(30)


@pytest.mark.parametrize("variant", ["base", "expressive"])
def test_listening_prefills_while_spoken_and_answers_as_the_whole_prompt_would(request, variant, clip):
    spirit_lm = _model(request, variant)
    lm = spirit_lm.lm
    conversation = Conversation(spirit_lm, output_modality="SPEECH", max_new_tokens=30)
    conversation.segments = [
        ("TEXT", "Hello there."),
        ("SPEECH", spirit_lm.speech_tokenizer.encode_string(clip[:8000])),
    ]
    history = list(conversation.segments)
    lm.reset()
    listening = conversation.listen()
    step = listening.encoder.step
    _speak(listening, clip, settle_every=step // 512)
    # what the cache holds is the start of the prompt the answer will have
    prefilled = listening.stats["prefilled_tokens"]
    assert prefilled > 0 and listening.encoder.windows >= 2
    events = list(listening.respond())
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.timings["streamed_prefill_tokens"] == prefilled
    assert end.timings["streamed_windows"] == listening.encoder.windows - 1  # the last one ran in respond()

    # the same turn through the whole-prompt path, from an empty cache: the same answer
    units = StreamingEncoder(spirit_lm.speech_tokenizer).encode_string(clip)
    assert conversation.segments[len(history)] == ("SPEECH", units)
    lm.reset()
    again = Conversation(spirit_lm, output_modality="SPEECH", max_new_tokens=30)
    again.segments = history
    reference = list(again.stream([("SPEECH", clip)], speech_encoding="streaming"))[-1]
    assert end.generated == reference.generated
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_array_equal(audio, reference.audio)


def test_listening_cache_is_a_prefix_of_the_final_prompt(base, clip):
    conversation = Conversation(base, output_modality="TEXT", max_new_tokens=5)
    base.lm.reset()
    listening = conversation.listen()
    _speak(listening, clip[: 4 * SAMPLE_RATE], settle_every=10)
    cached = list(base.lm._cached)
    assert cached
    final = base.tokenizer.encode(
        conversation.spirit_lm.build_prompt([("SPEECH", clip[: 4 * SAMPLE_RATE])], "TEXT", speech_encoding="streaming")
    )
    assert final[: len(cached)] == cached and final[-1] == base.tokenizer.vocab.text_id
    list(listening.respond())


def test_feed_never_waits_for_the_model(base, clip, monkeypatch):
    conversation = Conversation(base, output_modality="SPEECH", max_new_tokens=5)
    listening = conversation.listen()
    slow = threading.Event()
    real_advance = listening.encoder.advance

    def slow_advance(audio):
        slow.set()
        time.sleep(0.5)
        return real_advance(audio)

    monkeypatch.setattr(listening.encoder, "advance", slow_advance)
    listening.feed(clip[: 3 * SAMPLE_RATE])
    assert slow.wait(10)
    started = time.perf_counter()
    for start in range(3 * SAMPLE_RATE, 6 * SAMPLE_RATE, 512):
        listening.feed(clip[start : start + 512])
    assert time.perf_counter() - started < 0.1  # appended while the worker was busy
    listening.cancel()
    listening.thread.join(10)
    assert not listening.thread.is_alive()


def test_cancel_stops_the_prefill_within_a_slice(base, clip, monkeypatch):
    conversation = Conversation(base, output_modality="SPEECH")
    conversation.segments = [("TEXT", "word " * 300)]  # a long prompt to prefill: several slices
    base.lm.reset()
    listening = conversation.listen()
    slices = []
    real_prefill = base.lm.prefill
    started = threading.Event()

    def slow_prefill(ids):
        slices.append(len(ids))
        started.set()
        time.sleep(0.2)
        return real_prefill(ids)

    monkeypatch.setattr(base.lm, "prefill", slow_prefill)
    listening.feed(clip)
    assert started.wait(20)
    listening.cancel()
    listening.thread.join(10)
    assert not listening.thread.is_alive()
    assert len(slices) <= 2  # the slice in progress, at most one more
    assert all(b - a <= PREFILL_SLICE_TOKENS for a, b in zip([0, *slices], slices, strict=False))
    with pytest.raises(ModelError, match="cancelled"):
        next(listening.respond())


def test_a_model_lock_in_use_skips_the_prefill(base, clip):
    lock = threading.Lock()
    conversation = Conversation(base, output_modality="SPEECH", max_new_tokens=5)
    base.lm.reset()
    with lock:  # another client's turn holds the model
        listening = conversation.listen(model_lock=lock)
        _speak(listening, clip, settle_every=20)
        assert listening.stats["prefilled_tokens"] == 0 and listening.encoder.windows >= 1
    units, timings = listening.finish()
    assert units == listening.encoder.text and timings["streamed_prefill_tokens"] == 0


def test_an_encoder_failure_reaches_respond(base, clip, monkeypatch):
    listening = Conversation(base).listen()

    def broken(audio):
        raise UnitsError("broken encoder")

    monkeypatch.setattr(listening.encoder, "advance", broken)
    listening.feed(clip)
    listening.thread.join(10)
    with pytest.raises(UnitsError, match="broken encoder"):
        next(listening.respond())


def test_respond_with_a_shorter_turn_falls_back_to_whole(base, clip, caplog):
    listening = Conversation(base, output_modality="SPEECH", max_new_tokens=3).listen()
    _speak(listening, clip, settle_every=20)
    short = clip[: listening.encoder.final_samples // 2]
    units, _ = listening.finish(short)
    assert units == base.speech_tokenizer.encode_string(short)
    assert "encoding it whole" in caplog.text


# --------------------------------------------------------------------------- agreement


def test_agreement_command(tiny_base_bundle, librispeech_clip, tmp_path, base, clip):
    from typer.testing import CliRunner

    from spiritlm_edge.bench.agreement import compare
    from spiritlm_edge.cli import app

    result = compare(base.speech_tokenizer, clip, StreamingWindow())
    whole = np.array(base.speech_tokenizer.encode_units(clip)["hubert"].split(), dtype=np.int64)
    encoder = StreamingEncoder(base.speech_tokenizer)
    encoder.encode_string(clip)
    streamed = np.array(encoder.codes["hubert"])
    assert result.frames["hubert"] == (int((whole == streamed).sum()), len(whole))
    # a window as long as the recording is the whole-turn encoding: full agreement
    everything = compare(base.speech_tokenizer, clip, StreamingWindow(left_s=20, step_s=20, lookahead_s=20))
    assert everything.frame_share("hubert") == 1.0 and everything.token_share == 1.0

    out = tmp_path / "agreement.json"
    run = CliRunner().invoke(
        app,
        [
            "agreement",
            "--bundle",
            str(tiny_base_bundle),
            str(librispeech_clip),
            "--stream-window",
            "1:0.5:0.5",
            "--json",
            str(out),
        ],
    )
    assert run.exit_code == 0, run.output
    assert "hubert frames" in run.output and "0.5 s look-ahead" in run.output
    assert out.is_file()
    bad = CliRunner().invoke(
        app, ["agreement", "--bundle", str(tiny_base_bundle), str(librispeech_clip), "--stream-window", "1:0"]
    )
    assert bad.exit_code != 0 and "LEFT:STEP:LOOKAHEAD" in bad.output


# --------------------------------------------------------------------------- the live loop


@pytest.mark.slow
def test_live_loop_streams_turns_and_barge_in(base, clip):
    from spiritlm_edge.runtime.audio_io import RecordingOutput, ScriptedInput
    from spiritlm_edge.runtime.live import LiveLoop
    from spiritlm_edge.runtime.vad import SileroVAD, TurnDetector, packaged_model_path

    if packaged_model_path() is None:
        pytest.skip("Silero VAD model not installed")
    conversation = Conversation(base, output_modality="SPEECH", max_new_tokens=150, seed=0, do_sample=True)
    started = []

    def listen(after=None):
        listening = conversation.listen(after=after)
        started.append(listening)
        return listening

    speed = 4.0
    audio_in = ScriptedInput(clip, at=0.5, speed=speed).add(clip[: int(2.8 * SAMPLE_RATE)], at=12.0)
    audio_out = RecordingOutput(speed=speed)
    loop = LiveLoop(
        conversation.respond,
        audio_in,
        audio_out,
        SileroVAD(),
        TurnDetector(end_silence_ms=2000),
        max_seconds=40.0,
        max_turns=2,
        listen=listen,
    )
    summary = loop.run()
    assert summary.ended_by == "max_turns" and len(summary.turns) == 2
    assert summary.turns[0].interrupted  # the second turn barged in, and was streamed from there
    assert len(started) == 2  # one Listening per turn, none for the answer's own audio
    for turn, listening in zip(summary.turns, started, strict=True):
        fed = listening._turn_audio()
        # the turn's audio begins with what was streamed (the detector trims only the end)
        np.testing.assert_array_equal(
            turn.user_audio[: min(len(fed), len(turn.user_audio))], fed[: len(turn.user_audio)]
        )
        assert listening.encoder.finished
    second = summary.turns[1].timings
    assert "streamed_windows" in second and second["turn_audio_s"] == pytest.approx(
        len(summary.turns[1].user_audio) / SAMPLE_RATE
    )


# --------------------------------------------------------------------------- the benchmark


def test_first_audio_bench_runs_both_modes(tiny_base_bundle, tmp_path, capsys):
    import json

    from spiritlm_edge.bench.first_audio import main, question

    assert len(question(2.5, np.ones(16000, np.float32))) == 40000  # the clip repeated, then cut
    out = tmp_path / "first_audio.json"
    argv = ["--bundle", str(tiny_base_bundle), "--questions", "1.5,3", "--repeat", "1", "--warmup", "0"]
    assert main([*argv, "--max-new-tokens", "40", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["question_s"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(1.5, "whole"), (1.5, "streaming"), (3.0, "whole"), (3.0, "streaming")}
    assert all(r["first_audio_s"] > 0 for r in rows.values())
    # 3 s at real-time pace: the encoder made chunks final and the LM prefilled them meanwhile
    assert rows[(3.0, "streaming")]["prefilled_while_speaking"] > 0
    assert 0.5 <= rows[(3.0, "streaming")]["unencoded_at_end_s"] <= 3.0  # the look-ahead, at least
    assert report["pipeline_peak_rss_gb"] > 0 and report["machine"]["cpu"]
    assert "first audio after end of speech" in capsys.readouterr().out


# --------------------------------------------------------------------------- pauses


def _speak_with_detector(listening, audio, committed_until, total, block=512):
    """Feed ``total`` samples of ``audio`` (zeros past its end) as a turn detector would:
    ``committed`` follows the audio up to ``committed_until``, then stays (a pause)."""
    padded = np.concatenate([audio, np.zeros(max(0, total - len(audio)), np.float32)])
    for start in range(0, total, block):
        end = min(start + block, total)
        listening.feed(padded[start:end], committed=min(end, committed_until))
        if start % (8 * block) == 0:
            listening.settle(30)
    assert listening.settle(30)


def test_a_pause_finishes_the_turn_on_trial_and_respond_reuses_it(base, clip):
    conversation = Conversation(base, output_modality="SPEECH", max_new_tokens=20)
    base.lm.reset()
    listening = conversation.listen()
    end = 6 * SAMPLE_RATE + 4000  # the turn as a detector would keep it
    _speak_with_detector(listening, clip, committed_until=end, total=end + SAMPLE_RATE)
    # the whole turn's prompt is in the cache before the turn is over
    trial_length, trial = listening._trial
    assert trial_length == end and trial.finished
    final = base.tokenizer.encode(build_prompt([("SPEECH", trial.text)], "SPEECH", vocab=base.tokenizer.vocab))
    assert base.lm.cached_prefix(final) == len(final)
    events = list(listening.respond(clip[:end]))
    timings = events[-1].timings
    assert timings["streamed_finish"] == 1.0
    assert conversation.segments[0] == ("SPEECH", trial.text)
    # a trial finish is an ordinary finish: the same units as finishing at that length
    again = StreamingEncoder(base.speech_tokenizer)
    for arrived in range(512, end + 1, 512):
        again.advance(clip[:arrived])
    again.finish(clip[:end])
    assert again.text == trial.text and again.codes == trial.codes


def test_speech_after_a_pause_drops_the_trial(base, clip):
    paused = Conversation(base, output_modality="SPEECH", max_new_tokens=5).listen()
    pause_at = 3 * SAMPLE_RATE
    # speech, a pause (committed stays), then the speech goes on
    padded = clip.copy()
    for start in range(0, len(clip), 512):
        stop = start + 512
        committed = min(stop, pause_at) if stop < pause_at + SAMPLE_RATE else stop
        paused.feed(padded[start:stop], committed=committed)
        if start % (8 * 512) == 0 or stop == pause_at + SAMPLE_RATE:
            paused.settle(30)
    paused.settle(30)
    assert paused._trial is not None and paused._trial[0] == pause_at
    units, timings = paused.finish(clip)
    assert timings["streamed_finish"] == 0.0
    # the trial changed nothing: the units are those of the encoder's own steps and finish
    assert units == paused.encoder.text
    assert units == units_to_string(paused.encoder.codes)
