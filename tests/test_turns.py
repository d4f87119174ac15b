"""Turn taking (runtime/turns.py): the state machine shared by the live loop and the server."""

from __future__ import annotations

import numpy as np
import pytest

from spiritlm_edge.runtime.errors import AudioError
from spiritlm_edge.runtime.turns import BargeIn, SpeechIgnored, SpeechStarted, SpeechStopped, TurnEnded, TurnTaking
from spiritlm_edge.runtime.vad import BLOCK_MS, BLOCK_SAMPLES, TurnDetector


class ScriptedVAD:
    """Speech probability taken from the block itself (its first sample), counting calls."""

    def __init__(self):
        self.calls = 0
        self.resets = 0

    def __call__(self, block):
        self.calls += 1
        return float(block[0])

    def reset(self):
        self.resets += 1


def run(turns: TurnTaking, probs, answering=lambda i: False):
    events = []
    for i, p in enumerate(probs):
        for event in turns.feed(np.full(BLOCK_SAMPLES, p, dtype=np.float32), answering=answering(i)):
            events.append((i, event))
    return events


def kinds(events):
    return [type(e).__name__ for _, e in events]


def make(**kwargs):
    detector = TurnDetector(start_ms=160, end_silence_ms=320, min_speech_ms=100, pad_ms=64)
    return TurnTaking(ScriptedVAD(), detector, **kwargs)


def test_a_turn_gives_started_stopped_ended_with_positions():
    turns = make()
    events = run(turns, [0.0] * 10 + [0.9] * 20 + [0.0] * 12)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "TurnEnded"]
    started, stopped, ended = (e for _, e in events)
    # Speech starts at block 10; the utterance keeps 2 blocks (64 ms) of pre-roll.
    assert started.audio_start_ms == pytest.approx(8 * BLOCK_MS) and not started.during_answer
    assert events[1][0] == 29 + 10  # 10 silent blocks (320 ms) after the last speech block
    assert stopped.audio_end_ms == pytest.approx(40 * BLOCK_MS)
    assert ended.audio_start_ms == started.audio_start_ms and ended.audio_end_ms == stopped.audio_end_ms
    assert ended.speech_ms == pytest.approx(20 * BLOCK_MS)
    assert len(ended.audio) == (2 + 20 + 2) * BLOCK_SAMPLES


@pytest.mark.parametrize("speech_blocks, barges", [(8, False), (9, False), (10, True), (30, True)])
def test_barge_in_needs_barge_in_min_ms_of_speech(speech_blocks, barges):
    """300 ms: 9 blocks (288 ms) of speech over the answer are a back-channel, 10 (320 ms) cut it."""
    turns = make(barge_in_min_ms=300)
    events = run(turns, [0.0] * 5 + [0.9] * speech_blocks + [0.0] * 15, answering=lambda i: True)
    names = kinds(events)
    assert names[0] == "SpeechStarted" and events[0][1].during_answer
    if barges:
        barge_at = next(i for i, e in events if isinstance(e, BargeIn))
        assert barge_at == 5 + 9  # the tenth speech block
        assert names == ["SpeechStarted", "BargeIn", "SpeechStopped", "TurnEnded"]
    else:
        assert names == ["SpeechStarted", "SpeechStopped", "SpeechIgnored"]
        assert events[-1][1].reason == "backchannel"


def test_speech_that_outlives_the_answer_is_a_turn_only_when_long_enough():
    # The answer ends 2 blocks after the user's speech is confirmed: 12 blocks (384 ms) is a turn ...
    events = run(make(), [0.0] * 5 + [0.9] * 12 + [0.0] * 15, answering=lambda i: i < 11)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "TurnEnded"]
    # ... 8 blocks (256 ms) started during the answer is still a back-channel.
    events = run(make(), [0.0] * 5 + [0.9] * 8 + [0.0] * 15, answering=lambda i: i < 11)
    assert kinds(events)[-1] == "SpeechIgnored"


def test_barge_in_min_ms_below_start_ms_cuts_at_speech_start():
    events = run(make(barge_in_min_ms=0), [0.0] * 3 + [0.9] * 6 + [0.0] * 12, answering=lambda i: True)
    assert kinds(events)[:2] == ["SpeechStarted", "BargeIn"]
    assert events[0][0] == events[1][0]


def test_without_barge_in_the_microphone_is_deaf_while_answering_and_starts_clean():
    turns = make(barge_in=False)
    vad = turns.vad
    events = run(turns, [0.9] * 30 + [0.0] * 12, answering=lambda i: i < 20)
    # Nothing is heard (no VAD call) during the answer; afterwards the state was reset once.
    assert vad.calls == 42 - 20 and vad.resets == 1
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "TurnEnded"]
    assert events[0][0] == 20 + 4  # 5 fresh speech blocks after the answer
    assert turns.position_ms == pytest.approx(42 * BLOCK_MS)


def test_short_speech_is_ignored_and_reset_restarts_positions():
    turns = make()
    events = run(turns, [0.0] * 3 + [0.9] * 5 + [0.0] * 12)
    # 5 blocks confirm a start; 160 ms >= min_speech_ms 100: a turn.
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "TurnEnded"]
    detector = TurnDetector(start_ms=64, end_silence_ms=320, min_speech_ms=200, pad_ms=0)
    turns = TurnTaking(ScriptedVAD(), detector)
    events = run(turns, [0.9] * 3 + [0.0] * 12)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "SpeechIgnored"]
    assert isinstance(events[1][1], SpeechStopped) and events[2][1].reason == "short"
    turns.reset()
    assert turns.position_ms == 0 and not turns.speaking


def test_bad_input_is_a_clear_error():
    with pytest.raises(AudioError, match="512 samples"):
        make().feed(np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="barge_in_min_ms"):
        make(barge_in_min_ms=-1)


def test_event_types_are_exported():
    assert {SpeechStarted, BargeIn, SpeechStopped, TurnEnded, SpeechIgnored}
