"""The layers stand where docs/ARCHITECTURE.md draws them: arrows run downwards only.

Static (every import of every module, at the top or inside a function) and at run time (what the segment command
loads): cli -> infer -> sparse -> model -> sam2_ext; the engine stands on model, data and report; data and report
stand on neither sam2_ext nor the engine; sam2_ext imports nothing from icl.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str = "") -> set[str]:
    """Every module ``path`` imports, anywhere in it (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _package(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


GRAPH = {_module_name(p): _imports(p, _package(p)) for folder in ("icl", "sam2_ext") for p in (ROOT / folder).rglob("*.py")}


def _offenders(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    def under(name: str, roots: tuple[str, ...]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    return sorted(f"{m} imports {i}" for m, imps in GRAPH.items() if under(m, importers)
                  for i in imps if under(i, forbidden))


@pytest.mark.parametrize("importers, forbidden", [
    (("sam2_ext",), ("icl",)),
    (("icl.data", "icl.report"), ("sam2_ext", "icl.engine", "icl.model", "icl.sparse", "icl.infer", "icl.cli",
                                  "icl.options")),
    (("icl.errors", "icl.io", "icl.progress"), ("sam2_ext", "icl.data", "icl.report", "icl.model", "icl.engine",
                                                "icl.sparse", "icl.infer", "icl.cli", "icl.options")),
    (("icl.model",), ("icl.engine", "icl.sparse", "icl.infer", "icl.cli", "icl.options")),
    (("icl.sparse",), ("icl.engine", "icl.infer", "icl.cli", "icl.options")),
    (("icl.infer",), ("icl.engine", "icl.cli")),
    (("icl.engine",), ("icl.infer", "icl.cli")),
    (("icl.napari",), ("icl.engine", "icl.cli", "icl.options")),
], ids=["sam2_ext", "data+report", "errors+io+progress", "model", "sparse", "infer", "engine", "napari"])
def test_arrows_run_downwards(importers, forbidden):
    assert GRAPH, "no modules found"
    assert _offenders(importers, forbidden) == []


def test_only_the_plugin_imports_napari():
    """napari and Qt are the viewer plugin's own dependencies: the engine, the CLI and the API never load them."""
    assert [m for m, imps in GRAPH.items() if not (m == "icl.napari" or m.startswith("icl.napari."))
            for i in imps if i.split(".")[0] in ("napari", "qtpy", "PyQt6", "npe2", "superqt", "magicgui")] == []
    assert "icl.napari.widget" in GRAPH


def test_the_graph_sees_function_level_imports_too(tmp_path):
    assert "icl.model.dice" in GRAPH
    code = "def f():\n    from icl.engine.train import loop\n"
    path = tmp_path / "probe.py"
    path.write_text(code)
    assert "icl.engine.train.loop" in _imports(path)


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.split()


def test_inference_imports_nothing_from_the_training_engine():
    loaded = _modules_after("from icl.api import ICLSegmenter\nimport icl.segment\nICLSegmenter(checkpoint='none')\n"
                            "icl.segment.main.__module__\nimport icl.cli.segment as s\n"
                            "s.parse_segment_args(['--support', 's', '--support-label', 'l', '--query', 'q',"
                            " '--out', 'o'])")
    assert "icl.model.build" in loaded and "icl.sparse.fill" in loaded
    assert [m for m in loaded if m.startswith("icl.engine")] == []


def test_options_do_not_import_the_segment_command():
    assert "icl.cli.segment" not in _modules_after("import icl.options.common, icl.options.train")
