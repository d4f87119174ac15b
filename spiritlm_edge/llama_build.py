"""How llama.cpp (llama-cpp-python, compiled from source) is built on this machine.

llama.cpp compiles its AMX kernels (``ggml-cpu/amx``, used by the extra CPU buffer types) when
the compiler defines ``__AMX_INT8__``: with the default ``GGML_NATIVE`` build, ``-march=native`` on
a CPU with AMX (Intel Sapphire Rapids and later). GCC before 13 defines ``_tile_loadconfig`` as
inline asm whose memory operand covers 8 of the tile configuration's 64 bytes, so the optimiser
drops the stores that fill it: GCC 12.2 -O3 compiles llama.cpp 0.3.36's ``ggml_tile_config_init``
to a zeroed block with only the palette byte set before ``ldtilecfg``, and the first prefill with
the extra buffers dies with SIGSEGV. GCC 13 fixed the header; clang's intrinsic is a builtin, but
clang 14 names the macro ``__AMXINT8__``, so llama.cpp leaves its AMX kernels out there. Hence,
only where AMX code would be compiled:

- the C++ compiler is clang or GCC >= 13: built as is;
- it is an older GCC and an installed clang defines ``__AMX_INT8__``: built with that clang;
- otherwise: built without AMX (``-mno-amx-*``; the AVX-512 kernels stay), with one line saying
  how to get the AMX path.

Elsewhere (no AMX, the common case) nothing changes and no compiler is asked. pip caches the
wheel it builds by source, not by compiler or flags, so where AMX is involved the wheel is built
into a folder of its own named after the decision and the CPU, and installed from there: a
changed decision builds anew, an unchanged one reuses it.

Standard library only: ``make setup`` runs it with the venv's Python before the package is
installed (``python spiritlm_edge/llama_build.py install llama-cpp-python==X``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

FIXED_GCC = 13  # the first GCC whose _tile_loadconfig tells the compiler it reads 64 bytes
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # beat -march=native in any order
NO_AMX_OPTIONS = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")  # non-native builds
TRUE = {"1", "on", "yes", "true", "y"}


@dataclass(frozen=True)
class Compiler:
    """A C++ compiler as its preprocessor describes itself."""

    command: str
    kind: str  # "gcc", "clang" or "other"
    version: str  # e.g. "12.2.0"
    amx_macro: bool = True  # -mamx-int8 defines __AMX_INT8__, the macro llama.cpp's AMX code needs

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0]) if self.version[:1].isdigit() else 0

    def __str__(self) -> str:
        return f"{self.kind} {self.version}" if self.kind != "other" else self.command


@dataclass(frozen=True)
class Plan:
    """How to build: AMX kernels or not, what to add to the build's environment, where the wheel lives."""

    amx: bool
    env: dict[str, str] = field(default_factory=dict)  # additions to os.environ for pip
    tag: str | None = None  # the private wheel folder's name; None: a plain `pip install`
    note: str = ""  # one line for the user, empty when there is nothing to say


def parse_compiler(command: str, macros: str) -> Compiler:
    """A compiler from its predefined macros under ``-mamx-tile -mamx-int8``
    (``CXX -dM -E -x c++ -mamx-tile -mamx-int8 /dev/null``)."""
    defined = dict(re.findall(r"^#define (\w+) (.*)$", macros, re.MULTILINE))
    amx = "__AMX_INT8__" in defined
    if "__clang__" in defined:  # clang also defines __GNUC__ (as 4): ask it first
        parts = [defined.get(f"__clang_{p}__", "0") for p in ("major", "minor", "patchlevel")]
        return Compiler(command, "clang", ".".join(parts), amx)
    if "__GNUC__" in defined and "__INTEL_COMPILER" not in defined:
        parts = [defined.get(m, "0") for m in ("__GNUC__", "__GNUC_MINOR__", "__GNUC_PATCHLEVEL__")]
        return Compiler(command, "gcc", ".".join(parts), amx)
    return Compiler(command, "other", "", amx)


def _macros(command: str, *flags: str) -> str | None:
    try:
        result = subprocess.run(
            [command, "-dM", "-E", "-x", "c++", *flags, os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def identify(command: str) -> Compiler | None:
    """Ask ``command`` for its predefined macros with AMX asked for (without, if it refuses the
    flags); None if it does not run."""
    macros = _macros(command, "-mamx-tile", "-mamx-int8")
    if macros is None:
        macros = _macros(command)
        if macros is None:
            return None
        return replace(parse_compiler(command, macros), amx_macro=False)
    return parse_compiler(command, macros)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first ``flags`` line of ``/proc/cpuinfo``."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cmake_option(cmake_args: Sequence[str], name: str) -> str | None:
    """The last value given to ``-D<name>`` (or ``-D<name>:TYPE``) in ``cmake_args``: CMake keeps the last."""
    value = None
    for arg in cmake_args:
        match = re.fullmatch(rf"-D{name}(?::\w+)?=(.*)", arg)
        if match:
            value = match.group(1)
    return value


def cxx_command(env: Mapping[str, str]) -> str:
    """The C++ compiler CMake will use: ``-DCMAKE_CXX_COMPILER`` in CMAKE_ARGS, else $CXX, else ``c++``."""
    return cmake_option(env.get("CMAKE_ARGS", "").split(), "CMAKE_CXX_COMPILER") or env.get("CXX") or "c++"


def _add_flags(env: Mapping[str, str], name: str, flags: str) -> str:
    return f"{env[name]} {flags}" if env.get(name) else flags


def decide(flags: frozenset[str], env: Mapping[str, str], cxx: Compiler | None, clang: Compiler | None) -> Plan:
    """The plan for a CPU with ``flags``, the build environment ``env`` (CMAKE_ARGS, CXX, ...),
    the C++ compiler CMake would use and the clang++ on PATH (None: none)."""
    user_args = env.get("CMAKE_ARGS", "").split()
    # GGML_NATIVE defaults to ON except for reproducible builds (SOURCE_DATE_EPOCH) and cross builds
    native_default = "OFF" if "SOURCE_DATE_EPOCH" in env else "ON"
    native = (cmake_option(user_args, "GGML_NATIVE") or native_default).lower() in TRUE
    explicit = (cmake_option(user_args, "GGML_AMX_INT8") or "OFF").lower() in TRUE
    if not ((native and "amx_int8" in flags) or explicit):
        return Plan(amx=False)  # no AMX code is compiled: the build stays exactly as pip does it
    cpu = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:8]  # -march=native bakes the CPU in
    if cxx is not None and (cxx.kind == "clang" or (cxx.kind == "gcc" and cxx.major >= FIXED_GCC)):
        if cxx.amx_macro:
            note = f"llama.cpp: AMX kernels built by {cxx}"
        else:
            note = f"llama.cpp: {cxx} does not define __AMX_INT8__, so llama.cpp leaves its AMX kernels out"
        return Plan(amx=cxx.amx_macro, tag=f"{cxx.kind}-{cxx.version}-cpu{cpu}", note=note)
    why = (
        f"{cxx} miscompiles llama.cpp's AMX tile set-up" if cxx else f"the C++ compiler ({cxx_command(env)}) is unknown"
    )
    if clang is not None and clang.amx_macro:
        c_compiler = re.sub(r"clang\+\+(-[\d.]+)?$", r"clang\1", clang.command)
        args = [*user_args, f"-DCMAKE_C_COMPILER={c_compiler}", f"-DCMAKE_CXX_COMPILER={clang.command}"]
        return Plan(
            amx=True,
            env={"CMAKE_ARGS": " ".join(args)},
            tag=f"clang-{clang.version}-cpu{cpu}",
            note=f"llama.cpp: built with {clang} ({why}; fixed in GCC {FIXED_GCC})",
        )
    found = f"; the installed clang {clang.version} does not" if clang else ""
    how = f"install GCC >= {FIXED_GCC} or a clang that defines __AMX_INT8__ (clang 14 names it __AMXINT8__{found})"
    return Plan(
        amx=False,
        env={
            "CFLAGS": _add_flags(env, "CFLAGS", NO_AMX_FLAGS),
            "CXXFLAGS": _add_flags(env, "CXXFLAGS", NO_AMX_FLAGS),
            "CMAKE_ARGS": " ".join([*user_args, *NO_AMX_OPTIONS]),
        },
        tag=f"{cxx.kind if cxx else 'unknown'}-{cxx.version if cxx else ''}-noamx-cpu{cpu}",
        note=(
            f"llama.cpp: built WITHOUT its AMX kernels ({why}; fixed in GCC {FIXED_GCC}). "
            f"For the AMX path {how}, then rebuild (make clean setup)."
        ),
    )


def plan_for_this_machine(env: Mapping[str, str] | None = None) -> Plan:
    env = os.environ if env is None else env
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no AMX to worry about
        flags = frozenset()
    if "amx_int8" not in flags and "GGML_AMX_INT8" not in env.get("CMAKE_ARGS", ""):
        return Plan(amx=False)  # the common case: no compiler is even asked
    clang_path = shutil.which("clang++")
    return decide(flags, env, identify(cxx_command(env)), identify(clang_path) if clang_path else None)


def wheel_folder(tag: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "spiritlm-edge" / "llama-cpp-wheels" / tag


def install(spec: str, plan: Plan, python: str = sys.executable) -> int:
    """``pip install spec`` built as ``plan`` says; pip's exit code."""
    env = {**os.environ, **plan.env}
    if plan.tag is None:
        return subprocess.call([python, "-m", "pip", "install", "-v", spec], env=env)
    folder = wheel_folder(plan.tag)
    name, _, version = spec.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    if not list(folder.glob(pattern)):
        # --no-cache-dir: pip's cache may hold a wheel built under another decision
        build = [python, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(folder), spec]
        code = subprocess.call(build, env=env)
        if code:
            return code
    wheels = sorted(folder.glob(pattern))
    if not wheels:
        print(f"no wheel matching {pattern} in {folder}", file=sys.stderr)
        return 1
    return subprocess.call([python, "-m", "pip", "install", "-v", str(wheels[-1])], env=env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="print the decision for this machine (nothing when there is nothing to say)")
    inst = sub.add_parser("install", help="pip install llama-cpp-python built as decided")
    inst.add_argument("spec", help="e.g. llama-cpp-python==0.3.36")
    args = parser.parse_args(argv)
    plan = plan_for_this_machine()
    if args.command == "plan":
        if plan.note:
            print(plan.note)
        for name, value in plan.env.items():
            print(f"  {name}={value}")
        return 0
    return install(args.spec, plan)


if __name__ == "__main__":
    sys.exit(main())
