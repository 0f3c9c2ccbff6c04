"""Static checks of the Dockerfiles (no Docker engine on the dev/CI machines), hadolint-style,
plus running the images' entry commands outside Docker."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """Parse a Dockerfile into (INSTRUCTION, argument) pairs, joining continuation lines."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned(dockerfile):
    froms = [arg for ins, arg in instructions(dockerfile) if ins == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert "@sha256:" in image or re.search(r":\d+(\.\d+)+", image), f"unpinned base {image}"
        assert not image.endswith(":latest")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root(dockerfile):
    ins = instructions(dockerfile)
    users = [arg for i, arg in ins if i == "USER"]
    assert users and users[-1] not in {"root", "0"}, "last USER must be non-root"
    last_user = max(k for k, (i, _) in enumerate(ins) if i == "USER")
    entry = max(k for k, (i, _) in enumerate(ins) if i in {"ENTRYPOINT", "CMD"})
    assert last_user < entry


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_install_is_setup_sh(dockerfile):
    ins = instructions(dockerfile)
    runs = [arg for i, arg in ins if i == "RUN"]
    assert any(re.search(r"(^|\s)\./setup\.sh\b", r) for r in runs), "image must install with ./setup.sh"
    copy_idx = min(k for k, (i, _) in enumerate(ins) if i == "COPY")
    setup_idx = min(k for k, (i, a) in enumerate(ins) if i == "RUN" and "setup.sh" in a)
    assert copy_idx < setup_idx
    for r in runs:
        assert "sudo" not in r.split()
        assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", r), "no piping downloads into a shell"
        if "apt-get install" in r:
            assert "--no-install-recommends" in r and "-y" in r
            assert "apt-get update" in r, "update and install in one RUN layer"
            assert "rm -rf /var/lib/apt/lists/*" in r
    for i, arg in ins:
        if i == "WORKDIR":
            assert arg.startswith("/")
        assert i != "ADD", "use COPY, not ADD"
    if dockerfile.name.endswith(".cuda"):
        env = " ".join(a for i, a in ins if i == "ENV")
        assert "ICL_CUDA=1" in env, "CUDA image must take setup.sh's CUDA path"


def test_setup_sh_installs_what_docker_relies_on():
    text = (ROOT / "setup.sh").read_text()
    assert "requirements.txt" in text and "sam2==1.1.0" in text and "ICL_CUDA" in text
    assert "SAM2_BUILD_CUDA=0" in text


def test_dockerignore_keeps_data_and_venv_out_and_the_default_model_in():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored = {line.rstrip("/") for line in lines}
    for must in (".git", ".venv", "datasets", "checkpoint/*"):
        assert must in ignored, must
    # Docker applies the last matching line: the image must ship the default model (icl.cli.demo, segment without -w)
    assert lines.index("!checkpoint/icl_tiny_cpu.pth") > lines.index("checkpoint/*")


def _entry_command(dockerfile: Path) -> list[str]:
    ins = dict((i, a) for i, a in instructions(dockerfile) if i in {"ENTRYPOINT", "CMD"})
    entry, cmd = json.loads(ins["ENTRYPOINT"]), json.loads(ins["CMD"])
    assert entry == ["/app/.venv/bin/python"], "entry point is the venv's python"
    return cmd


def test_entry_commands_run_outside_docker():
    """Every Dockerfile's default CMD and the documented script entry points start (``--help``) with the venv's
    python; a command two images share is run once (each run is a fresh interpreter: seconds of imports)."""
    commands = [_entry_command(d) for d in DOCKERFILES] + [["train_3d.py"], ["eval_3d.py"], ["-m", "icl.segment"]]
    for cmd in dict.fromkeys(tuple(c) for c in commands):
        proc = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
        assert "usage" in proc.stdout.lower()
