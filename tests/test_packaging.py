"""The edge install has no torch: every runtime module must import without it."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, pkgutil, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchaudio", "torchfcpe", "transformers", "onnx"):
                raise ImportError(f"{name} is blocked: the edge install has no torch")
            if BLOCK_UPPER_LAYERS and name.split(".")[:2] in (
                ["spiritlm_edge", "export"], ["spiritlm_edge", "quant"], ["spiritlm_edge", "bench"]
            ):
                raise ImportError(f"{name} is blocked: runtime/ must not import the layers above it")
            return None

    BLOCK_UPPER_LAYERS = True
    sys.meta_path.insert(0, BlockTorch())
    import spiritlm_edge, spiritlm_edge.runtime, spiritlm_edge.units
    names = []
    for info in pkgutil.iter_modules(spiritlm_edge.runtime.__path__):
        __import__(f"spiritlm_edge.runtime.{info.name}")
        names.append(info.name)
    # the lazily re-exported public API resolves too
    for name in spiritlm_edge.__all__:
        getattr(spiritlm_edge, name)
    assert "torch" not in sys.modules
    print(" ".join(sorted(names)))
    """
)


def test_runtime_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    imported = result.stdout.split()
    for module in ("audio", "bundle", "pipeline", "units"):
        assert module in imported


def test_cli_help_lists_commands_without_torch():
    # the CLI sits above every layer: it may import export/ (lazily), but --help must not need torch
    code = BLOCK_TORCH.replace('print(" ".join(sorted(names)))', "").replace(
        "BLOCK_UPPER_LAYERS = True", "BLOCK_UPPER_LAYERS = False"
    ) + textwrap.dedent(
        """
        from typer.testing import CliRunner
        from spiritlm_edge.cli import app
        out = CliRunner().invoke(app, ["--help"])
        assert out.exit_code == 0, out.output
        print(out.output)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "make-tiny-checkpoints" in result.stdout
    assert "export" in result.stdout


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "spiritlm_edge.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("spiritlm-edge ")


@pytest.mark.parametrize("subpackage", ["runtime", "export", "quant", "bench"])
def test_subpackages_map_to_top_level_folders(subpackage):
    module = __import__(f"spiritlm_edge.{subpackage}", fromlist=["_"])
    assert Path(module.__file__).resolve().parent == REPO / subpackage


def test_a_bundle_runs_with_the_edge_install_alone(tiny_base_bundle, librispeech_clip):
    """Speech in, speech out, in a process where torch, transformers, onnx, export/, quant/ and
    bench/ cannot be imported."""
    code = BLOCK_TORCH.replace('print(" ".join(sorted(names)))', "") + textwrap.dedent(
        f"""
        from spiritlm_edge import SpiritLM
        model = SpiritLM({str(tiny_base_bundle)!r}, n_threads=1)
        out = model.generate([("SPEECH", {str(librispeech_clip)!r})], output_modality="SPEECH", max_new_tokens=30)
        assert out[0].content.size > 0
        assert not any(m.split(".")[0] in ("torch", "transformers", "onnx") for m in sys.modules)
        print("ok", out[0].content.size)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ")
