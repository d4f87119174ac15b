"""Echo cancellation on a real audio server: PulseAudio, started by the test, with two null
sinks: ``speaker`` (the live loop's output) and ``room``, whose monitor is the microphone. A
loopback module plays the speaker's monitor into the room, so the answer comes back into the
microphone through PortAudio, ALSA's pulse plugin and PulseAudio's own buffering (a real echo
path, with delays nobody told the canceller). The user's voice is played into the room from a
file with ``paplay``.

Each session runs in a child process (PortAudio reads PULSE_SERVER when it starts): the user
asks, ``respond`` answers with real speech (the LibriSpeech clip), and we see whether the
answer was interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spiritlm_edge.runtime.vad import packaged_model_path

REPO = Path(__file__).resolve().parent.parent
VOICES = REPO / "tests" / "data" / "aec"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(packaged_model_path() is None, reason="Silero VAD model not installed"),
]

SERVER_CONFIG = """
load-module module-native-protocol-unix socket={socket} auth-anonymous=1
load-module module-null-sink sink_name=speaker rate=16000 channels=1
load-module module-null-sink sink_name=room rate=16000 channels=1
load-module module-loopback source=speaker.monitor sink=room latency_msec=30
set-default-sink speaker
set-default-source room.monitor
"""

CHILD = r"""
import json, logging, subprocess, sys, threading, time
import numpy as np
from spiritlm_edge.runtime.aec import EchoCanceller
from spiritlm_edge.runtime.audio import load_audio
from spiritlm_edge.runtime.audio_io import SoundDeviceInput, SoundDeviceOutput
from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
from spiritlm_edge.runtime.live import LiveLoop
from spiritlm_edge.runtime.vad import SileroVAD, TurnDetector

aec_on, question, interruption, answer_path = sys.argv[1] == "on", sys.argv[2], sys.argv[3], sys.argv[4]
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
answer = load_audio(answer_path)

def say(path):  # the user talks into the room
    subprocess.run(["paplay", "--device=room", path], check=True, timeout=30)

def respond(audio):
    for i in range(0, len(answer), 8000):
        yield AudioChunk(answer[i : i + 8000])
    yield TurnEnd()

statuses, times = [], {}
def on_status(message):
    statuses.append(message)
    times[message.split(" ")[0]] = time.monotonic()
    if message.startswith("heard") and interruption != "-":
        threading.Timer(2.5, say, [interruption]).start()  # 2.5 s into the answer

aec = EchoCanceller() if aec_on else None
loop = LiveLoop(respond, SoundDeviceInput("pulse"), SoundDeviceOutput("pulse"), SileroVAD(), TurnDetector(),
                on_status=on_status, max_turns=1, max_seconds=40.0, aec=aec)
threading.Timer(1.0, say, [question]).start()
summary = loop.run()
print(json.dumps({
    "turns": len(summary.turns), "interrupted": [t.interrupted for t in summary.turns],
    "answer_s": [t.answer_samples / 16000 for t in summary.turns], "ended_by": summary.ended_by,
    "statuses": statuses, "delay_ms": aec.delay.delay_ms if aec else None,
    "interrupted_after_s": (
        times["(interrupted)"] - times["heard"] if "(interrupted)" in times else None
    ),
}))
"""


@pytest.fixture(scope="module")
def pulse_server(tmp_path_factory):
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PulseAudio cannot start: {', '.join(missing)} not installed (apt-get install pulseaudio)")
    if not list(Path("/usr/lib").glob("*/alsa-lib/libasound_module_pcm_pulse.so")):
        pytest.skip(
            "PortAudio cannot reach PulseAudio: ALSA's pulse plugin missing (apt-get install libasound2-plugins)"
        )
    pytest.importorskip("sounddevice", reason="sounddevice (the mic extra) not installed")
    pytest.importorskip("pywebrtc_audio", reason="pywebrtc-audio (the mic extra) not installed")
    home = tmp_path_factory.mktemp("pulse")
    socket = home / "native"
    (home / "default.pa").write_text(SERVER_CONFIG.format(socket=socket))
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home)}
    log = open(home / "pulseaudio.log", "w")
    server = subprocess.Popen(
        [
            "pulseaudio",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "-n",
            "-F",
            str(home / "default.pa"),
            "--log-target=stderr",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client_env = {**env, "PULSE_SERVER": f"unix:{socket}"}
    deadline = time.monotonic() + 15
    while subprocess.run(["pactl", "info"], env=client_env, capture_output=True).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            log.close()
            pytest.skip(f"PulseAudio cannot start here: {(home / 'pulseaudio.log').read_text()[-500:]}")
        time.sleep(0.2)
    yield client_env
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def session(env, aec: str, interruption: str = "-") -> dict:
    clip = REPO / "runtime" / "data" / "librispeech-7143-88743-0029.flac"
    question = VOICES / "near-question.flac"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, aec, str(question), interruption, str(clip)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["log"] = run.stderr
    print(
        f"\nPulseAudio session, aec {aec}, interruption {Path(interruption).name}: "
        f"{ {k: v for k, v in result.items() if k != 'log'} }"
    )
    print("\n".join(line for line in run.stderr.splitlines() if "echo" in line))
    return result


def test_own_echo_does_not_interrupt_with_aec(pulse_server):
    result = session(pulse_server, "on")
    assert result["turns"] == 1, result
    assert result["interrupted"] == [False], result["log"][-3000:]
    assert result["answer_s"][0] > 9.0
    assert "echo delay:" in result["log"]  # the delay found is logged


def test_own_echo_interrupts_without_aec(pulse_server):
    # The negative control: the same echo path, no cancellation.
    result = session(pulse_server, "off")
    assert result["turns"] == 1 and result["interrupted"] == [True], result


def test_user_interrupts_with_aec(pulse_server):
    result = session(pulse_server, "on", str(VOICES / "near-stop.flac"))
    assert result["turns"] == 1 and result["interrupted"] == [True], result
    # by the user, who starts talking 2.5 s into the answer (plus paplay's start), not by the echo
    assert 2.5 <= result["interrupted_after_s"] <= 4.0, result
