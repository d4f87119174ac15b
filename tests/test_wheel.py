"""The README's Jetson route: build a wheel with `pip wheel`, install it into a fresh venv
away from the source tree, and run a bundle with the installed `spiritlm-edge`."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_a_bundle(tmp_path, tiny_base_bundle):
    # build from a copy of the sources, so nothing untracked or left over in the checkout leaks in
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "out"
        ),
    )
    dist = tmp_path / "dist"
    # no build isolation where setuptools is at hand: no download, and seconds instead of a minute
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(dist), str(src)],
        check=True,
        cwd=tmp_path,
    )
    wheels = list(dist.glob("spiritlm_edge-*.whl"))
    assert len(wheels) == 1, wheels
    shutil.rmtree(src)  # the installed package must stand on its own

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheels[0])], check=True
    )
    # The dependencies (onnxruntime, llama-cpp-python, ...) come from this test's environment, to
    # keep the test fast: a .pth adds its site-packages *after* the venv's own, and pip did not
    # process that directory's .pth files (so its editable install of spiritlm-edge stays off).
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import spiritlm_edge; from spiritlm_edge.runtime.audio import BUNDLED_CLIP; "
            "print(spiritlm_edge.__file__); print(BUNDLED_CLIP); print(spiritlm_edge.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.split("\n")
    assert Path(where[0]).is_relative_to(site), where  # the wheel's copy, not the checkout's
    assert Path(where[1]).is_file() and Path(where[1]).is_relative_to(site)  # package data shipped
    assert where[2] == "0.1.0"

    answer = tmp_path / "answer.wav"
    run = subprocess.run(
        [
            str(venv / "bin" / "spiritlm-edge"),
            "run",
            "--bundle",
            str(tiny_base_bundle),
            "--input",
            where[1],
            "--output",
            str(answer),
            "--max-new-tokens",
            "60",
            "--seed",
            "0",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert answer.stat().st_size > 44, run.stderr


def test_readme_installs_only_what_exists():
    """spiritlm-edge is on no registry: the README installs it from a checkout or a wheel, the
    route the test above runs."""
    readme = (REPO / "README.md").read_text()
    assert not re.search(r"pip install spiritlm-edge\b(?!\[)", readme)
    assert "pip wheel --no-deps -w dist ." in readme and "pip install spiritlm_edge-*.whl" in readme
