"""The README's commands run as written (#27): the quick tour's Python and shell snippets on small generated data,
and no document points outside the repository (a clone has no ``../shared``)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safety_fixtures import draw, make_volume, save

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell lines of a block: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and
            not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    """The files the quick tour names, generated: a labelled support scan, another scan, a sparse drawing."""
    root = tmp_path_factory.mktemp("tour")
    image, label = make_volume(0)
    other, _ = make_volume(1)
    third, third_label = make_volume(2)
    for name, array in [("support.nii.gz", image), ("support_label.nii.gz", label), ("query.nii.gz", other),
                        ("S.nii.gz", image), ("S_lab.nii.gz", label), ("Q.nii.gz", other),
                        ("S_sparse.nii.gz", draw(label, 2)), ("A.nii.gz", image), ("A_lab.nii.gz", label),
                        ("B.nii.gz", third), ("B_lab.nii.gz", third_label)]:
        save(array, root / name)
    return root


def test_quick_tour_python_runs_as_written(tour, monkeypatch):
    code = _blocks(_section("Quick tour"), "python")
    assert code, "the quick tour has a Python snippet"
    monkeypatch.chdir(tour)
    for snippet in code:
        exec(compile(snippet, "README.md", "exec"), {})
    assert (tour / "pred.nii.gz").is_file()


def test_quick_tour_commands_run_as_written(tour):
    commands = [c for block in _blocks(_section("Quick tour"), "bash") for c in _commands(block)]
    assert len(commands) >= 2 and all(c.startswith("python -m icl.segment") for c in commands), commands
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for command in commands:
        args = command.split()
        done = subprocess.run([sys.executable, *args[1:]], cwd=tour, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
        assert not any(line.startswith(("error", "Traceback")) for line in done.stderr.splitlines()), done.stderr
        out = args[args.index("--out") + 1]
        assert (tour / out).is_file(), command


def test_the_readme_points_nowhere_outside_the_repository():
    """Links are checked in test_docs_links; here the paths written in code spans too (``../shared/...``)."""
    outside = re.findall(r"`(\.\./[^`\s]*)`", README) + re.findall(r"\]\((\.\./[^)]*)\)", README)
    assert not outside, outside
