"""llama.cpp's extra CPU buffer types: on only where this machine runs them safely and faster.

llama.cpp can repack weights into "extra" CPU buffer types (AMX / AVX-512 kernels,
``use_extra_bufts``). Whether that helps depends on the CPU and the build: on Sapphire
Rapids with llama-cpp-python 0.3.36 built by GCC 12 a 7B dies with SIGSEGV inside
``llama_decode``; on AMD Zen 4 it runs but prefills slower (18-20 vs 28-29 tok/s). So the
choice is made per machine by a one-time check (:func:`check`): each setting loads the model
in a child process (a crash is reported, never taken), prefills and decodes, and the buffers
are turned on only if they survived, were faster for prefill or decode, and did not take more
memory: llama.cpp keeps the weights it repacks beside the original ones, so on a 7B Q4_K_M
they cost about 3 GB more (7.35 vs 4.29 GB peak on a Zen 4, ``info --check-cpu-buffers``), which
an 8 GB device cannot give (``--cpu-buffers on`` takes them anyway). The decision is cached
(platformdirs user cache) per CPU model + llama.cpp build (llama-cpp-python version,
``llama_print_system_info`` and a fingerprint of its libraries, so a rebuild by another compiler
or with other flags decides anew) + quant type, and :func:`resolve` reads it at each load.

Without a cached decision the buffers stay off and nothing is measured at load: the check
loads the model twice more (seconds to tens of seconds for a 7B on a small CPU, and a second
copy of the weights in memory beside a running pipeline), which a kiosk starting up must not
pay and which cannot be made short without making the figures noise. Off is the setting known
to run everywhere; ``spiritlm-edge info BUNDLE --check-cpu-buffers`` makes the decision once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf

from spiritlm_edge.runtime.errors import ModelError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
FASTER = 1.05  # "faster" means by more than timing noise on a shared machine
MEMORY_SLACK = 1.05  # and "no more memory" means a peak within 5% of the plain buffers' one
CHECK_HINT = "`spiritlm-edge info BUNDLE --check-cpu-buffers` decides it for this machine"

# One setting, run in a child process: load, prefill n_prompt unit tokens, decode n_new.
CHILD = """
import json, os, resource, sys, time
from spiritlm_edge.runtime.lm import LanguageModel
path, mode, threads, n_prompt, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lm = LanguageModel(path, n_threads=threads, n_ctx=max(256, n_prompt + n_new + 8), n_gpu_layers=0,
                   extra_cpu_buffers=mode)
ids = [lm.bos_id] + [lm.vocab.hubert_start + (i * 7) % lm.vocab.hubert_count for i in range(n_prompt)]
start = time.perf_counter()
lm.prefill(ids)
prefill = n_prompt / (time.perf_counter() - start)
start = time.perf_counter()
new = lm.generate_ids(ids, n_new, do_sample=False, output_modality="SPEECH")
decode = (len(new) - 1) / (time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "peak_rss_bytes": peak,
                  "pid": os.getpid()}))
"""


@dataclass(frozen=True)
class BufferDecision:
    """Whether the LM uses the extra CPU buffers, and why (``source``: option, cache or default)."""

    enabled: bool
    reason: str
    source: str

    def __str__(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what the platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quant_type(meta: dict[str, Any]) -> str:
    """The GGUF's quant type (``general.file_type``), e.g. ``Q4_K_M``."""
    value = meta.get("general.file_type")
    if value is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type_{int(value)}"


@functools.cache
def build_id() -> str:
    """A fingerprint of the llama.cpp libraries this process loads: the same version and
    features built by another compiler (GCC 12 vs clang, with or without AMX) is another build."""
    import llama_cpp

    digest = hashlib.sha256()
    folder = os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib"  # llama_cpp's own override
    for lib in sorted(Path(folder).glob("lib*.so")):
        digest.update(lib.name.encode() + lib.read_bytes())
    return digest.hexdigest()[:16]


def machine_key(quant: str) -> dict[str, str]:
    """What the decision depends on: the CPU, the llama.cpp build, the quant type."""
    import llama_cpp

    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = getattr(llama_cpp, "__version__", "unknown")
    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return {"cpu": cpu_model(), "llama_cpp_python": version, "system_info": system, "build": build_id(), "quant": quant}


def _key_id(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_path() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("spiritlm-edge")) / "cpu-buffers.json"


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_check(quant: str) -> dict[str, Any] | None:
    """The stored check for this machine, build and quant type, or None."""
    entry = _read_cache().get(_key_id(machine_key(quant)))
    return entry if isinstance(entry, dict) and "enabled" in entry else None


def _store(key: dict[str, str], entry: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache()
    data[_key_id(key)] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def run_setting(
    gguf_path: str | os.PathLike, enabled: bool, n_threads: int, n_prompt: int, n_new: int, timeout: float
) -> dict[str, Any]:
    """One setting in a child process: its speeds, or how it died."""
    argv = [
        sys.executable,
        "-c",
        CHILD,
        str(gguf_path),
        "on" if enabled else "off",
        str(n_threads),
        str(n_prompt),
        str(n_new),
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"survived": False, "error": f"no answer within {timeout:.0f} s"}
    if result.returncode != 0:
        reason = f"exit code {result.returncode}"
        if result.returncode < 0:  # killed by a signal, e.g. the AMX crash's SIGSEGV
            try:
                reason = f"signal {-result.returncode} ({signal.Signals(-result.returncode).name})"
            except ValueError:
                reason = f"signal {-result.returncode}"
        tail = result.stderr.strip().splitlines()[-1:]
        return {"survived": False, "error": " ".join([reason, *tail])[:300]}
    try:
        return {"survived": True, **json.loads(result.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError):
        return {"survived": False, "error": f"unreadable answer: {result.stdout[-200:]!r}"}


def _verdict(off: dict[str, Any], on: dict[str, Any]) -> tuple[bool, str]:
    if not off["survived"]:
        raise ModelError(f"The LM does not run even without the extra CPU buffers: {off['error']}")
    if not on["survived"]:
        return False, f"they crashed in the check ({on['error']})"
    ratios = {kind: on[f"{kind}_tokens_per_s"] / off[f"{kind}_tokens_per_s"] for kind in ("prefill", "decode")}
    figures = ", ".join(f"{kind} x{ratio:.2f}" for kind, ratio in ratios.items())
    if not any(ratio > FASTER for ratio in ratios.values()):
        return False, f"they ran but were not faster in the check ({figures})"
    memory = (on.get("peak_rss_bytes") or 0, off.get("peak_rss_bytes") or 0)
    if memory[1] and memory[0] > MEMORY_SLACK * memory[1]:
        extra = (memory[0] - memory[1]) / 1e9
        return False, (
            f"they ran and were faster in the check ({figures}) but took {extra:.1f} GB more memory "
            "(a second copy of the weights); --cpu-buffers on takes them anyway"
        )
    return True, f"they ran and were faster in the check ({figures})"


def check(
    gguf_path: str | os.PathLike,
    quant: str,
    n_threads: int | None = None,
    n_prompt: int = 128,
    n_new: int = 9,
    timeout: float = 900,
    store: bool = True,
) -> dict[str, Any]:
    """Run both settings (each in a child process), decide, and cache the decision."""
    from spiritlm_edge.runtime.threads import default_threads

    n_threads = int(n_threads or default_threads())
    key = machine_key(quant)
    runs = {name: run_setting(gguf_path, name == "on", n_threads, n_prompt, n_new, timeout) for name in ("off", "on")}
    enabled, reason = _verdict(runs["off"], runs["on"])
    entry = {
        "enabled": enabled,
        "reason": reason,
        **runs,
        "threads": n_threads,
        "prompt_tokens": n_prompt,
        "new_tokens": n_new,
        "gguf": str(gguf_path),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "key": key,
    }
    if store:
        _store(key, entry)
    return entry


def parse_mode(value: str | bool | None) -> str:
    """``auto``/``on``/``off`` (True/False and None accepted for on/off/auto)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise ModelError(f"extra_cpu_buffers={value!r}: expected one of {', '.join(MODES)}.")
    return mode


_told: set[str] = set()


def resolve(option: str | bool | None, quant: str) -> BufferDecision:
    """The setting for a load: the explicit option, else this machine's cached check, else off."""
    mode = parse_mode(option)
    if mode != "auto":
        return BufferDecision(mode == "on", f"--cpu-buffers {mode} / extra_cpu_buffers={mode!r}", "option")
    entry = cached_check(quant)
    if entry is not None:
        return BufferDecision(bool(entry["enabled"]), f"{entry['reason']}, {entry['date']}", "cache")
    if quant not in _told:  # once per process and quant type
        _told.add(quant)
        log.info("llama.cpp extra CPU buffers: off (not checked on this machine for %s; %s)", quant, CHECK_HINT)
    return BufferDecision(False, f"not checked on this machine for {quant}: off, known to run; {CHECK_HINT}", "default")
