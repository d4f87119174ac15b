"""Each layer imports only the layers below it (README "Architecture"); checked on the source,
function-local imports included, so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folder -> subpackage name; a module may import modules of its own rank or lower
LAYERS = {"runtime": "runtime", "export": "export", "quant": "quant", "bench": "bench", "spiritlm_edge": ""}
BUNDLE_ASSEMBLY = "export.build"  # the one export/ module above quant/: it runs the converter and quantizer
RANKS = {"runtime": 0, "export": 1, "quant": 2, BUNDLE_ASSEMBLY: 3, "bench": 4, "": 5}


def _rank(module: str) -> int:
    """Rank of ``module`` given relative to ``spiritlm_edge`` ("runtime.lm", "export.build", "cli");
    the package root itself ("") is imported by every module anyway (its API is re-exported lazily)."""
    if module == "":
        return 0
    if module == BUNDLE_ASSEMBLY or module.startswith(BUNDLE_ASSEMBLY + "."):
        return RANKS[BUNDLE_ASSEMBLY]
    return RANKS.get(module.split(".")[0], RANKS[""])


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spiritlm_edge"):
            base = node.module.removeprefix("spiritlm_edge").lstrip(".")
            if base in RANKS and base != "":  # `from spiritlm_edge.export import hubert`
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.removeprefix("spiritlm_edge").lstrip("."))
                for a in node.names
                if a.name.startswith("spiritlm_edge.")
            ]
    return found


def _modules():
    for folder, prefix in LAYERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            stem = "" if path.stem == "__init__" else path.stem
            yield path, ".".join(p for p in (prefix, stem) if p)


def test_every_import_points_down():
    upward = []
    for path, module in _modules():
        rank = _rank(module) if module else RANKS[""]  # spiritlm_edge/__init__.py sits on top
        for line, target in _imports(path):
            if _rank(target) > rank:
                upward.append(f"{path.relative_to(REPO)}:{line} ({module}) imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from spiritlm_edge.export import lm\n    import spiritlm_edge.bench.latency\n")
    assert [t for _, t in _imports(bad)] == ["export.lm", "bench.latency"]
    assert _rank("export.lm") > _rank("runtime.lm") and _rank("bench.latency") > _rank(BUNDLE_ASSEMBLY)
    assert _rank("export.build") > _rank("quant.gguf_convert") > _rank("export.lm")


def test_benchmark_of_a_bundle_needs_no_torch():
    """`spiritlm-edge bench --bundle` runs on a device with the edge install: only --synthetic and
    the reference path need export/ (torch)."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx") or name.startswith("spiritlm_edge.export"):
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import spiritlm_edge.bench.latency
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
