"""ctest fixture: start / stop `spiritlm-edge serve` on a tiny bundle for the C client's tests.

    server_fixture.py start --exe PATH --state DIR --clip FILE
    server_fixture.py stop --state DIR

`start` builds the tiny bundle once (cached in DIR/bundle), starts three servers on free
loopback ports (the main one with a token, a "victim" the server-killed test SIGKILLs, and
one serving wss:// with a self-signed certificate) and two fake servers (fake_server.py),
waits until both answer GET /healthz with 200, writes DIR/server.env (KEY=VALUE lines the
C tests read) and returns; the servers keep running until `stop`. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TOKEN = "c-client-test-token"
READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_bundle(exe: str, state: Path) -> Path:
    bundle = state / "bundle"
    if (bundle / "bundle.json").exists() or (bundle / "manifest.json").exists():
        return bundle
    ckpt = state / "checkpoints"
    log = state / "bundle-build.log"
    with log.open("w") as out:
        for cmd in (
            [exe, "make-tiny-checkpoints", str(ckpt), "--variant", "base"],
            [exe, "build", "--checkpoints", str(ckpt), "--variant", "base", "--out", str(bundle), "--quant", "Q8_0"],
        ):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode != 0:
                sys.exit(f"fixture: {' '.join(cmd)} failed; see {log}")
    return bundle


def self_signed(state: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    cert, key = state / "cert.pem", state / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def start_server(
    exe: str, bundle: Path, state: Path, name: str, token: str | None, tls: tuple[Path, Path] | None = None
) -> tuple[int, int]:
    port = free_port()
    cmd = [exe, "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    if token:
        cmd += ["--token", token]
    if tls:
        cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    log = (state / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid, port


def start_fake(exe: str, state: Path, name: str) -> tuple[int, int]:
    """fake_server.py on the server's own Python (it has aiohttp, the server's web library)."""
    port_file = state / f"{name}.port"
    port_file.unlink(missing_ok=True)
    python = Path(exe).parent / "python"
    log = (state / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [str(python), str(Path(__file__).with_name("fake_server.py")), str(port_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"fixture: the {name} server did not start:\n{(state / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc.pid, int(port_file.read_text())


def wait_ready(pid: int, port: int, state: Path, name: str, cert: Path | None = None) -> None:
    scheme = "https" if cert else "http"
    context = ssl.create_default_context(cafile=str(cert)) if cert else None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"fixture: the {name} server exited:\n{(state / f'{name}.log').read_text()[-4000:]}")
        # a server that exited is a zombie until reaped: reap without blocking
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                sys.exit(f"fixture: the {name} server exited:\n{(state / f'{name}.log').read_text()[-4000:]}")
        except ChildProcessError:
            pass
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/healthz", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    sys.exit(f"fixture: the {name} server was not ready within {READY_TIMEOUT_S:.0f} s")


def stop(state: Path) -> None:
    env = state / "server.env"
    if not env.exists():
        return
    fields = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    pids = [int(fields[k]) for k in ("PID", "VICTIM_PID", "FAKE_PID", "FROZEN_PID", "TLS_PID") if k in fields]
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGCONT)  # the keep-alive test stops one
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    env.unlink()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--exe", help="the spiritlm-edge executable")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--clip", help="the LibriSpeech clip the tests send")
    a = p.parse_args()
    a.state.mkdir(parents=True, exist_ok=True)
    if a.action == "stop":
        stop(a.state)
        return
    if not a.exe or not os.access(a.exe, os.X_OK):
        sys.exit(
            f"fixture: spiritlm-edge not found at {a.exe!r}; set SPIRITLM_EDGE_EXECUTABLE "
            "(CMake cache or environment) to the server's executable"
        )
    stop(a.state)  # a previous run's servers, if it was interrupted
    bundle = build_bundle(a.exe, a.state)
    main_pid, main_port = start_server(a.exe, bundle, a.state, "server", TOKEN)
    victim_pid, victim_port = start_server(a.exe, bundle, a.state, "victim", None)
    cert, key = self_signed(a.state)
    tls_pid, tls_port = start_server(a.exe, bundle, a.state, "tls", TOKEN, (cert, key))
    fake_pid, fake_port = start_fake(a.exe, a.state, "fake")
    frozen_pid, frozen_port = start_fake(a.exe, a.state, "frozen")
    (a.state / "server.env").write_text(
        f"URL=ws://127.0.0.1:{main_port}/v1/realtime\nTOKEN={TOKEN}\nPID={main_pid}\n"
        f"VICTIM_URL=ws://127.0.0.1:{victim_port}/v1/realtime\nVICTIM_PID={victim_pid}\nCLIP={a.clip}\n"
        f"FAKE_URL=ws://127.0.0.1:{fake_port}\nFAKE_PID={fake_pid}\n"
        f"FROZEN_URL=ws://127.0.0.1:{frozen_port}/idle\nFROZEN_PID={frozen_pid}\n"
        f"TLS_URL=wss://127.0.0.1:{tls_port}/v1/realtime\nTLS_PID={tls_pid}\nTLS_CA={cert}\n"
    )
    wait_ready(main_pid, main_port, a.state, "server")
    wait_ready(victim_pid, victim_port, a.state, "victim")
    wait_ready(tls_pid, tls_port, a.state, "tls", cert)
    print(f"fixture: servers ready on ports {main_port} (token) and {victim_port} (victim)")


if __name__ == "__main__":
    main()
