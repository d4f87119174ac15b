"""ctest: examples/cpp/duplex on a real audio path, against the fixture's server.

    duplex_pulse.py DUPLEX SERVER_ENV WORK_DIR

A private PulseAudio (started here) has two null sinks: ``speaker`` (duplex's output) and
``room``, whose monitor is duplex's microphone; PortAudio reaches them through ALSA's pulse
plugin. The LibriSpeech clip is played into the room: server VAD ends the turn and the answer
plays; 2 s into the answer the clip is played again, over it: duplex drops the answer's
queued audio, cancels it and says "[interrupted]". Under AddressSanitizer, leak checks are
off for this one test: PortAudio's ALSA/JACK plugins leave allocations in modules already
unloaded at exit, which LeakSanitizer can neither attribute nor suppress; every other test
checks the library for leaks. Exit 77 (ctest: skipped) when PulseAudio or the
ALSA plugin is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIG = """
load-module module-native-protocol-unix socket={socket} auth-anonymous=1
load-module module-null-sink sink_name=speaker rate=48000 channels=1
load-module module-null-sink sink_name=room rate=48000 channels=1
set-default-sink speaker
set-default-source room.monitor
"""
SKIP = 77


def main() -> int:
    duplex, env_file, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    missing = [t for t in ("pulseaudio", "pactl", "paplay") if shutil.which(t) is None]
    if missing or not list(Path("/usr/lib").glob("*/alsa-lib/libasound_module_pcm_pulse.so")):
        print(f"skipped: PulseAudio or ALSA's pulse plugin missing ({', '.join(missing) or 'libasound2-plugins'})")
        return SKIP
    server = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    socket = work / "native"
    (work / "default.pa").write_text(CONFIG.format(socket=socket))
    env = {**os.environ, "HOME": str(work), "XDG_RUNTIME_DIR": str(work), "XDG_CONFIG_HOME": str(work)}
    pulse = subprocess.Popen(
        [
            "pulseaudio",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "-n",
            "-F",
            str(work / "default.pa"),
            "--log-target=stderr",
        ],
        env=env,
        stdout=(work / "pulseaudio.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    client_env = {**env, "PULSE_SERVER": f"unix:{socket}"}
    client_env["ASAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS", ""), "detect_leaks=0"]))
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=client_env, capture_output=True).returncode != 0:
            if pulse.poll() is not None or time.monotonic() > deadline:
                print(f"PulseAudio did not start:\n{(work / 'pulseaudio.log').read_text()[-2000:]}")
                return 1
            time.sleep(0.2)
        proc = subprocess.Popen(
            [
                duplex,
                "--token",
                server["TOKEN"],
                "--rate",
                "48000",
                "--seconds",
                "20",
                "--input",
                "pulse",
                "--output",
                "pulse",
                server["URL"],
            ],
            env=client_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def say() -> None:
            subprocess.run(["paplay", "--device=room", server["CLIP"]], env=client_env, timeout=30)

        threading.Timer(1.0, say).start()
        lines: list[str] = []
        interrupted = False
        assert proc.stdout is not None
        for line in proc.stdout:  # duplex ends itself after --seconds
            lines.append(line)
            sys.stdout.write(line)
            if "[thinking]" in line and not interrupted:
                interrupted = True
                talk_over = threading.Timer(2.0, say)  # speak over the answer
                talk_over.start()
        rc = proc.wait(timeout=60)
        if interrupted:
            talk_over.join(timeout=30)
        out = "".join(lines)
        ok = rc == 0 and "[thinking]" in out and "[interrupted]" in out
        print(f"duplex exit {rc}; turn ended by VAD: {'[thinking]' in out}; barge-in: {'[interrupted]' in out}")
        return 0 if ok else 1
    finally:
        pulse.terminate()
        try:
            pulse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pulse.kill()


if __name__ == "__main__":
    sys.exit(main())
