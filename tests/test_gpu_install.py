"""The ``gpu`` extra installs one coherent CUDA-12 set (onnxruntime-gpu, TensorRT 10): pip's
resolver, in report mode, through .ci/check_gpu_install.py.

It needs PyPI: where PyPI cannot be reached the test is skipped with that reason (the
script says so and exits 77) rather than failing for a reason that is not ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_gpu_install.py"
UNREACHABLE = 77


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_one_cuda_12_set():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    if done.returncode == UNREACHABLE:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDA 12" in done.stdout


@pytest.mark.slow
def test_an_incoherent_extra_is_refused(tmp_path):
    """The pins as they were: onnxruntime-gpu>=1.17 (CUDA 13 today) and tensorrt>=10 (11.x)."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n[project.optional-dependencies]\ngpu = ["onnxruntime-gpu>=1.17", "tensorrt>=10"]\n'
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pyproject", str(pyproject)], capture_output=True, text=True, timeout=900
    )
    if done.returncode == UNREACHABLE:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 1
    assert "tensorrt-cu12" in done.stderr and "aarch64" in done.stderr


def test_an_unreachable_index_is_said_not_failed(tmp_path):
    """No network (here: a proxy that refuses): the script says PyPI cannot be reached and
    exits 77, which the tests above turn into a skip with that reason."""
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == UNREACHABLE
    assert "PyPI cannot be reached" in done.stderr and "not checked" in done.stderr
