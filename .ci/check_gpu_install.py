#!/usr/bin/env python3
"""Check that the ``gpu`` extra of pyproject.toml installs one coherent CUDA-12 set.

What it checks, for Linux x86_64 and Python 3.10, 3.11 and 3.12 (what the extra targets):

1. pip's resolver, in report mode (``pip install --dry-run --report``, nothing installed),
   picks an ``onnxruntime-gpu`` wheel for each Python;
2. that build is a CUDA 12 one: the NVIDIA packages its ``cuda`` / ``cudnn`` extras pull are
   CUDA 12 ones (``*-cu12``, ``~=12``), none CUDA 13;
3. its TensorRT EP links TensorRT 10 (``libnvinfer.so.10``: onnxruntime-gpu before 1.27), and
   the extra's TensorRT pin is the CUDA 12 package and admits 10.x only;
4. on Linux aarch64 (Jetson) the extra installs nothing: JetPack brings TensorRT, the Jetson
   AI Lab index brings onnxruntime-gpu (README, "Jetson").

TensorRT's wheels are on pypi.nvidia.com (PyPI holds stubs that fetch them at install time),
which pip cannot resolve in report mode for another platform; check 3 therefore reads the pin
itself, and resolves it too where pypi.nvidia.com answers.

Exit status: 0 coherent, 1 not coherent (the reasons are printed), 77 PyPI could not be
reached (nothing was checked, said so on stderr: a test treats that as a skip, not a failure).

    python .ci/check_gpu_install.py [--pyproject pyproject.toml]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

PYTHONS = ("3.10", "3.11", "3.12")
PLATFORM = "manylinux_2_28_x86_64"
# onnxruntime-gpu 1.27 moved PyPI's build to CUDA 13 and its TensorRT EP to TensorRT 11.
ORT_CUDA13_TRT11 = Version("1.27")
UNREACHABLE = 77
INDEXES = {"PyPI": "https://pypi.org/simple/onnxruntime-gpu/", "NVIDIA": "https://pypi.nvidia.com/tensorrt-cu12/"}


# What pip prints when the index, not the resolution, failed (a dropped connection mid-run).
NETWORK_TROUBLE = (
    "Could not fetch URL",
    "Max retries exceeded",
    "NewConnectionError",
    "Read timed out",
    "ConnectionResetError",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


class Unreachable(RuntimeError):
    """The index stopped answering: nothing can be concluded."""


def gpu_requirements(pyproject: Path) -> list[Requirement]:
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    return [Requirement(line) for line in extras["gpu"]]


def reachable(url: str, timeout: float = 15) -> str | None:
    """None if ``url`` answers, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def applies(requirement: Requirement, machine: str, python: str) -> bool:
    env = {
        **default_environment(),
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
        "python_version": python,
        "python_full_version": python + ".0",
    }
    return requirement.marker is None or requirement.marker.evaluate(env)


def resolve(requirement: str, python: str, index_url: str | None = None) -> dict:
    """pip's choice for ``requirement`` on Linux x86_64 and ``python``, from its report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--no-deps",
            "--ignore-installed",
            "--only-binary=:all:",
            "--platform",
            PLATFORM,
            "--python-version",
            python,
            "--report",
            str(report),
            requirement,
        ]
        if index_url:
            command += ["--extra-index-url", index_url]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        if done.returncode != 0:
            trouble = next((t for t in NETWORK_TROUBLE if t in done.stderr), None)
            if trouble is not None:
                raise Unreachable(f"the index stopped answering while resolving for Python {python} ({trouble})")
            lines = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()[-3:]
            raise RuntimeError(f"pip cannot resolve {requirement} for Python {python}: {' '.join(lines)[:400]}")
        (chosen,) = json.loads(report.read_text())["install"]
        return chosen["metadata"]


def cuda_majors(metadata: dict) -> set[str]:
    """CUDA majors of the NVIDIA packages that an onnxruntime-gpu wheel's extras pull."""
    majors = set()
    for line in metadata.get("requires_dist", []):
        requirement = Requirement(line)
        if not requirement.name.startswith("nvidia-"):
            continue
        suffix = re.search(r"-cu(\d+)$", requirement.name)
        if suffix:
            majors.add(suffix.group(1))
        elif requirement.name.startswith("nvidia-cuda-"):  # unsuffixed: the runtime's version is CUDA's
            majors.update(str(spec.version).split(".")[0] for spec in requirement.specifier)
    return majors


def check(pyproject: Path) -> list[str]:
    problems = []
    requirements = gpu_requirements(pyproject)
    by_name = {r.name: r for r in requirements}
    ort, trt = by_name.get("onnxruntime-gpu"), next((r for r in requirements if r.name.startswith("tensorrt")), None)
    if ort is None or trt is None:
        return [f"the gpu extra should hold onnxruntime-gpu and a tensorrt package; it holds {sorted(by_name)}"]
    for requirement in requirements:
        for python in PYTHONS:
            if not applies(requirement, "x86_64", python):
                problems.append(f"{requirement} does not apply on Linux x86_64, Python {python}")
        if applies(requirement, "aarch64", "3.10"):
            problems.append(
                f"{requirement} applies on Linux aarch64 (Jetson), where JetPack brings TensorRT and "
                "the Jetson AI Lab index onnxruntime-gpu"
            )

    # 3: TensorRT 10 for CUDA 12, nothing else
    if trt.name not in ("tensorrt-cu12", "tensorrt_cu12"):
        problems.append(f"{trt.name}: pin tensorrt-cu12, the CUDA 12 build (tensorrt itself follows the newest CUDA)")
    admitted = [v for v in ("8.6.1", "10.0.1", "10.9.0", "10.16.1", "11.0.0", "11.4.0") if trt.specifier.contains(v)]
    if not admitted or any(not v.startswith("10.") for v in admitted):
        problems.append(
            f"{trt}: admits {admitted or 'nothing'}; onnxruntime-gpu's TensorRT EP links "
            "libnvinfer.so.10, so TensorRT 10.x only"
        )

    # 1-3: what pip picks for each Python
    extras = f"[{','.join(sorted(ort.extras))}]" if ort.extras else ""
    for python in PYTHONS:
        try:
            chosen = resolve(f"onnxruntime-gpu{ort.specifier}", python)
        except Unreachable:
            raise
        except RuntimeError as exc:
            problems.append(str(exc))
            continue
        version = Version(chosen["version"])
        majors = cuda_majors(chosen)
        print(f"Python {python}: onnxruntime-gpu{extras} {version} (CUDA {', '.join(sorted(majors)) or '?'})")
        if majors != {"12"}:
            problems.append(f"Python {python}: onnxruntime-gpu {version} pulls CUDA {sorted(majors)} packages, not 12")
        if version >= ORT_CUDA13_TRT11:
            problems.append(f"Python {python}: onnxruntime-gpu {version} is a CUDA 13 / TensorRT 11 build")
    if reachable(INDEXES["NVIDIA"]) is None:
        for python in PYTHONS:
            try:
                chosen = resolve(f"tensorrt-cu12-libs{trt.specifier}", python, "https://pypi.nvidia.com")
                print(f"Python {python}: tensorrt-cu12 {chosen['version']}")
            except Unreachable as exc:
                print(f"pypi.nvidia.com stopped answering ({exc}): the TensorRT pin was checked as written only")
                break
            except RuntimeError as exc:
                problems.append(str(exc))
    else:
        print("pypi.nvidia.com (TensorRT's wheels) not reachable: the TensorRT pin was checked as written only")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    args = parser.parse_args(argv)
    why = reachable(INDEXES["PyPI"])
    if why is not None:
        print(f"PyPI cannot be reached ({why}): the gpu extra's resolution was not checked", file=sys.stderr)
        return UNREACHABLE
    try:
        problems = check(args.pyproject)
    except Unreachable as exc:
        print(f"PyPI cannot be reached: {exc}; the gpu extra's resolution was not checked", file=sys.stderr)
        return UNREACHABLE
    for problem in problems:
        print(f"NOT COHERENT: {problem}", file=sys.stderr)
    if not problems:
        print("the gpu extra is one CUDA 12 set")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
