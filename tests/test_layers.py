"""The layers stand where the docs say: inference (``icl.api``, ``icl.segment``, ``icl.sparse``) on ``icl.model``,
never on the training engine; ``icl.config`` and ``icl.segment`` do not import each other in a circle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.split()


def test_inference_imports_nothing_from_the_training_engine():
    loaded = _modules_after("from icl.api import ICLSegmenter\nimport icl.segment\nICLSegmenter(checkpoint='none')\n"
                            "icl.segment.parse_segment_args(['--support', 's', '--support-label', 'l', '--query', 'q',"
                            " '--out', 'o'])")
    assert "icl.model.build" in loaded and "icl.sparse.fill" in loaded
    assert [m for m in loaded if m.startswith("icl.engine")] == []


def test_config_does_not_import_the_segment_command():
    assert "icl.segment" not in _modules_after("import icl.config")
