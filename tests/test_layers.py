"""Each layer imports only the layers below it (README "Architecture"); checked on the source,
function-local imports included, so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folder -> subpackage name
LAYERS = {
    "runtime": "runtime",
    "server": "server",
    "export": "export",
    "quant": "quant",
    "bench": "bench",
    "spiritlm_edge": "",
}
# The export/ modules that assemble bundles and engines: they run the converter, the quantizer and
# the fp16 converter of quant/, so they sit above it.
ASSEMBLY = ("export.build", "export.tensorrt")
# layer -> the layers its modules may import (the README's diagram); "" is the CLI, the demo and
# the package root, which may import everything.
MAY_IMPORT = {
    "runtime": {"runtime"},
    "server": {"server", "runtime"},
    "export": {"export", "runtime"},
    "quant": {"quant", "export", "runtime"},
    "assembly": {"assembly", "quant", "export", "runtime"},
    "bench": {"bench", "assembly", "quant", "export", "server", "runtime"},
    "": {"", "bench", "assembly", "quant", "export", "server", "runtime"},
}


def _layer(module: str) -> str:
    """Layer of ``module`` given relative to ``spiritlm_edge`` ("runtime.lm", "export.build", "cli");
    the package root itself ("") is imported by every module anyway (its API is re-exported lazily),
    so it counts as the bottom layer when imported."""
    if module == "":
        return "runtime"
    if any(module == a or module.startswith(a + ".") for a in ASSEMBLY):
        return "assembly"
    top = module.split(".")[0]
    return top if top in MAY_IMPORT and top != "" else ""


def _may_import(importer: str, target: str) -> bool:
    return _layer(target) in MAY_IMPORT[_layer(importer) if importer else ""]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spiritlm_edge"):
            base = node.module.removeprefix("spiritlm_edge").lstrip(".")
            if base in MAY_IMPORT and base != "":  # `from spiritlm_edge.export import hubert`
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
        for line, target in _imports(path):
            if not _may_import(module, target):
                upward.append(f"{path.relative_to(REPO)}:{line} ({module}) imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from spiritlm_edge.export import lm\n    import spiritlm_edge.bench.latency\n")
    assert [t for _, t in _imports(bad)] == ["export.lm", "bench.latency"]
    assert not _may_import("runtime.lm", "export.lm") and not _may_import("runtime.lm", "server.app")
    assert not _may_import("export.lm", "quant.gguf_convert") and _may_import("export.build", "quant.gguf_convert")
    assert not _may_import("server.app", "export.lm") and not _may_import("export.lm", "server.app")
    assert _may_import("bench.server", "server.app") and not _may_import("quant.onnx_int8", "bench.latency")
    assert _may_import("cli", "bench.latency") and _may_import("demo", "export.build")


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
