"""How `make setup` builds llama.cpp (spiritlm_edge/llama_build.py): the decision per CPU and
compiler, the flags it yields checked with this machine's real compilers, and the wheel cache
it keeps apart per decision."""

import stat
import subprocess
import sys

import pytest

from spiritlm_edge import llama_build
from spiritlm_edge.llama_build import Compiler, Plan, decide

GCC12 = Compiler("g++", "gcc", "12.2.0")
GCC13 = Compiler("g++-13", "gcc", "13.1.0")
CLANG14 = Compiler("/usr/bin/clang++", "clang", "14.0.6", amx_macro=False)  # names it __AMXINT8__
CLANG18 = Compiler("/usr/bin/clang++", "clang", "18.1.3")
ZEN4 = frozenset("fpu sse4_2 avx2 avx512f avx512_vnni avx512_bf16".split())
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"}

# A 64-byte AMX tile configuration filled on the stack, then loaded (what ggml-cpu/amx/mmq.cpp
# does before its first tile multiply). 42 and 64 mark the stores GCC 12 drops.
TILE_CONFIG = r"""
#include <immintrin.h>
#include <cstdint>
struct config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
void configure_tiles() {
    alignas(64) config c = {};
    c.palette = 1;
    c.colsb[0] = 64;
    c.rows[0] = 42;
    _tile_loadconfig(&c);
}
"""
AMX_MACRO = "#ifdef __AMX_INT8__\nint amx_int8_on;\n#endif\n"


def test_compilers_are_named_by_their_predefined_macros():
    gcc = "#define __GNUC__ 12\n#define __GNUC_MINOR__ 2\n#define __GNUC_PATCHLEVEL__ 0\n#define __x86_64__ 1\n"
    assert llama_build.parse_compiler("g++", gcc + "#define __AMX_INT8__ 1\n") == GCC12
    assert not llama_build.parse_compiler("g++", gcc).amx_macro
    # clang defines __GNUC__ 4 as well: it must not pass for an old GCC
    clang = "#define __GNUC__ 4\n#define __clang__ 1\n#define __clang_major__ 14\n"
    clang += "#define __clang_minor__ 0\n#define __clang_patchlevel__ 6\n"
    assert llama_build.parse_compiler("clang++", clang + "#define __AMXINT8__ 1\n") == Compiler(
        "clang++", "clang", "14.0.6", amx_macro=False
    )
    assert llama_build.parse_compiler("icpc", "#define __INTEL_COMPILER 2021\n#define __GNUC__ 9\n").kind == "other"
    assert Compiler("x", "gcc", "13.2.1").major == 13 and Compiler("cl", "other", "").major == 0


def test_this_machines_compiler_is_identified():
    found = llama_build.identify("c++")
    assert found is not None and found.kind in ("gcc", "clang") and found.major >= 4
    assert llama_build.identify("/nonexistent/c++") is None
    if found.kind == "gcc":  # GCC names the macro as llama.cpp's guard expects
        assert found.amx_macro


def test_cpu_flags_and_cmake_options_are_read():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_int8\nbugs\t\t: none\nflags\t: other\n"
    assert llama_build.cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_tile", "amx_int8"}
    assert llama_build.cpu_flags("") == frozenset()
    args = "-DGGML_NATIVE=ON -DGGML_CUDA=on -DGGML_NATIVE:BOOL=OFF".split()
    assert llama_build.cmake_option(args, "GGML_NATIVE") == "OFF"  # CMake keeps the last
    assert llama_build.cmake_option(args, "GGML_AMX_INT8") is None
    assert llama_build.cxx_command({}) == "c++"
    assert llama_build.cxx_command({"CXX": "g++-13"}) == "g++-13"
    assert llama_build.cxx_command({"CXX": "g++", "CMAKE_ARGS": "-DCMAKE_CXX_COMPILER=clang++"}) == "clang++"


@pytest.mark.parametrize("cxx", [GCC12, GCC13, CLANG14, None])
def test_without_amx_the_build_is_exactly_pips(cxx):
    assert decide(ZEN4, {}, cxx, CLANG14) == Plan(amx=False)
    # GGML_NATIVE off (or a reproducible build) and no explicit AMX option: no AMX code either
    assert decide(SAPPHIRE_RAPIDS, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}, cxx, None) == Plan(amx=False)
    assert decide(SAPPHIRE_RAPIDS, {"SOURCE_DATE_EPOCH": "0"}, cxx, None) == Plan(amx=False)


@pytest.mark.parametrize("cxx", [GCC13, Compiler("g++-14", "gcc", "14.2.0"), CLANG18, CLANG14])
def test_a_fixed_compiler_builds_as_is(cxx):
    plan = decide(SAPPHIRE_RAPIDS, {}, cxx, None)
    assert plan.env == {} and plan.tag and plan.tag.startswith(cxx.kind) and str(cxx) in plan.note
    # clang 14 is safe too, but llama.cpp's AMX code is left out under its macro names: say so
    assert plan.amx is cxx.amx_macro
    assert ("leaves its AMX kernels out" in plan.note) is not cxx.amx_macro


def test_old_gcc_with_clang_installed_builds_with_clang():
    user = {"CMAKE_ARGS": "-DGGML_CUDA=on"}
    plan = decide(SAPPHIRE_RAPIDS, user, GCC12, CLANG18)
    assert plan.amx
    # the user's own options come first and survive; CMake keeps the last compiler given
    assert plan.env == {
        "CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_C_COMPILER=/usr/bin/clang -DCMAKE_CXX_COMPILER=/usr/bin/clang++"
    }
    assert "clang 18.1.3" in plan.note and "gcc 12.2.0" in plan.note
    versioned = decide(SAPPHIRE_RAPIDS, {}, GCC12, Compiler("clang++-19", "clang", "19.1.7"))
    assert versioned.env["CMAKE_ARGS"] == "-DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19"


@pytest.mark.parametrize("clang", [None, CLANG14, Compiler("clang++", "clang", "11.1.0", amx_macro=False)])
@pytest.mark.parametrize("cxx", [GCC12, Compiler("g++-11", "gcc", "11.4.0"), None])
def test_old_gcc_without_a_usable_clang_builds_without_amx(cxx, clang):
    plan = decide(SAPPHIRE_RAPIDS, {"CFLAGS": "-g", "CMAKE_ARGS": "-DGGML_CUDA=on"}, cxx, clang)
    assert not plan.amx
    assert plan.env["CFLAGS"] == "-g " + llama_build.NO_AMX_FLAGS
    assert plan.env["CXXFLAGS"] == llama_build.NO_AMX_FLAGS
    assert plan.env["CMAKE_ARGS"].split() == ["-DGGML_CUDA=on", *llama_build.NO_AMX_OPTIONS]
    # one line that says what happened and how to get the AMX path
    assert "WITHOUT" in plan.note and "GCC >= 13" in plan.note and "a clang that defines __AMX_INT8__" in plan.note
    assert "\n" not in plan.note and (clang is None or f"installed clang {clang.version} does not" in plan.note)


def test_explicit_amx_options_are_honoured_only_with_a_fixed_compiler():
    # a non-native build that asks for AMX (e.g. for another machine) on a CPU without it
    user = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON"}
    plan = decide(ZEN4, user, GCC12, None)
    assert not plan.amx and llama_build.cmake_option(plan.env["CMAKE_ARGS"].split(), "GGML_AMX_INT8") == "OFF"
    assert decide(ZEN4, user, GCC13, None).amx


def test_the_wheel_folder_changes_with_the_decision_and_the_cpu():
    tags = {
        decide(SAPPHIRE_RAPIDS, {}, GCC12, None).tag,
        decide(SAPPHIRE_RAPIDS, {}, GCC12, CLANG18).tag,
        decide(SAPPHIRE_RAPIDS, {}, GCC13, None).tag,
        decide(SAPPHIRE_RAPIDS | {"avx512_fp16"}, {}, GCC13, None).tag,
    }
    assert len(tags) == 4 and None not in tags


def test_a_machine_without_amx_asks_no_compiler(monkeypatch):
    if "amx_int8" in llama_build.cpu_flags(open("/proc/cpuinfo").read()):
        pytest.skip("this CPU has AMX")

    def no_probe(command):
        raise AssertionError("the common install must not probe compilers")

    monkeypatch.setattr(llama_build, "identify", no_probe)
    assert llama_build.plan_for_this_machine({}) == Plan(amx=False)
    result = subprocess.run(
        [sys.executable, llama_build.__file__, "plan"], capture_output=True, text=True, check=True, env={}
    )
    assert result.stdout == ""  # nothing to say on the common install


def _compile(plan: Plan, env: dict[str, str], source: str, *extra: str) -> str:
    """Compile ``source`` as llama.cpp's build would under ``plan`` on a Sapphire Rapids, where
    -march=native means -march=sapphirerapids; the preprocessed output or the assembly."""
    args = plan.env.get("CMAKE_ARGS", env.get("CMAKE_ARGS", "")).split()
    compiler = llama_build.cmake_option(args, "CMAKE_CXX_COMPILER") or llama_build.cxx_command(env)
    flags = plan.env.get("CXXFLAGS", env.get("CXXFLAGS", "")).split()
    command = [compiler, "-x", "c++", "-std=gnu++17", "-O3", *flags, "-march=sapphirerapids", *extra, "-", "-o", "-"]
    return subprocess.run(command, input=source, capture_output=True, text=True, check=True).stdout


def _local(command: str) -> Compiler:
    found = llama_build.identify(command)
    if found is None:
        pytest.skip(f"{command} is not installed")
    return found


@pytest.mark.parametrize("with_clang", [False, True])
def test_the_planned_flags_compile_amx_exactly_when_decided(with_clang):
    """With this machine's compilers, planned as for a Sapphire Rapids: the AMX macros are on
    exactly when the plan says so, and with AMX on, the tile configuration's stores survive."""
    env: dict[str, str] = {}
    cxx = _local("c++")
    clang = _local("clang++") if with_clang else None
    plan = decide(SAPPHIRE_RAPIDS, env, cxx, clang)
    macros = _compile(plan, env, AMX_MACRO, "-E")
    assert ("amx_int8_on" in macros) is plan.amx
    if plan.amx:
        assembly = _compile(plan, env, TILE_CONFIG, "-S")
        assert "ldtilecfg" in assembly and "$42" in assembly and "$64" in assembly


def test_old_gcc_drops_the_tile_configuration():
    """Why the plan avoids GCC < 13 for AMX: its _tile_loadconfig lets the stores go."""
    gcc = _local("g++")
    if gcc.kind != "gcc" or gcc.major >= llama_build.FIXED_GCC:
        pytest.skip(f"g++ is {gcc}: the bug is GCC < {llama_build.FIXED_GCC}'s")
    plan = Plan(amx=True)  # what the build did before: AMX kernels with this GCC
    assembly = _compile(plan, {"CXX": "g++"}, TILE_CONFIG, "-S")
    assert "ldtilecfg" in assembly and "$42" not in assembly and "$64" not in assembly


def _fake_python(tmp_path):
    """A `python` that logs its pip command and, for `pip wheel -w DIR`, leaves a wheel in DIR."""
    log = tmp_path / "calls.log"
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$* CMAKE_ARGS=$CMAKE_ARGS" >> {log}\n'
        'if [ "$3" = wheel ]; then while [ "$1" != -w ]; do shift; done; mkdir -p "$2"; '
        'touch "$2/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), log


def test_install_uses_pip_as_is_without_amx_and_a_private_wheel_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    python, log = _fake_python(tmp_path)
    assert llama_build.install("llama-cpp-python==0.3.36", Plan(amx=False), python) == 0
    assert log.read_text().splitlines() == ["-m pip install -v llama-cpp-python==0.3.36 CMAKE_ARGS="]

    log.unlink()
    plan = decide(SAPPHIRE_RAPIDS, {}, GCC12, CLANG18)
    for _ in range(2):  # built once, then reused
        assert llama_build.install("llama-cpp-python==0.3.36", plan, python) == 0
    folder = llama_build.wheel_folder(plan.tag)
    wheel = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    cmake_args = "CMAKE_ARGS=" + plan.env["CMAKE_ARGS"]
    assert log.read_text().splitlines() == [
        f"-m pip wheel -v --no-deps --no-cache-dir -w {folder} llama-cpp-python==0.3.36 {cmake_args}",
        f"-m pip install -v {wheel} {cmake_args}",
        f"-m pip install -v {wheel} {cmake_args}",
    ]
