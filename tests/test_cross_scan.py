"""Support from other scans (#25): registration is the classic fill of this road and ``auto``'s choice; several
support scans are fused; with two or more, leaving each out in turn gives the per-structure estimate; the same rules
through the API and the CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import icl.infer.segmenter as segmenter
from icl.api import ICLSegmenter
from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.cross_check import leave_one_out

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _scan(shift: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids in a noisy body, moved by ``shift`` voxels along x: (image, labels)."""
    yy, xx, zz = np.meshgrid(np.arange(48), np.arange(48), np.arange(24), indexing="ij")
    label = np.zeros((48, 48, 24), np.int16)
    label[((yy - 20 - shift) ** 2 + (xx - 24) ** 2 + 2 * (zz - 12) ** 2) < 100] = 1
    label[((yy - 32 - shift) ** 2 + (xx - 28) ** 2 + 2 * (zz - 10) ** 2) < 40] = 2
    body = ((yy - 24 - shift) ** 2 + (xx - 24) ** 2) < 22 ** 2
    image = 20 + 80 * body + 50 * (label == 1) + 90 * (label == 2)
    return (image + np.random.default_rng(seed).normal(0, 4, image.shape)).astype(np.float32), label


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross")
    out = {}
    for name, shift, seed in (("a", 0, 1), ("b", 2, 2), ("q", 1, 3)):
        image, label = _scan(shift, seed)
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"{name}_lab.nii.gz"))
        out[name], out[f"{name}_lab"] = root / f"{name}.nii.gz", root / f"{name}_lab.nii.gz"
    out["root"] = root
    return out


def test_auto_registers_another_scan_and_fuses_several(scans, capsys):
    truth = np.asarray(nib.load(str(scans["q_lab"])).dataobj)
    seg = ICLSegmenter(fill="registration")
    one = seg.segment(scans["q"], scans["a"], scans["a_lab"])
    assert one.mode == "registered" and one.supports == 1 and seg.predictor is None  # no model for registration
    assert [c.dice["registration"] for c in one.checks] == [None, None]
    assert "nothing can be checked" in one.checks[0].line()
    both = ICLSegmenter().segment(scans["q"], [scans["a"], scans["b"]], [scans["a_lab"], scans["b_lab"]])
    assert both.mode == "registered" and both.supports == 2 and [c.chosen for c in both.checks] == ["registration"] * 2
    for c in (1, 2):
        assert binary_dice(one.labels == c, truth == c) > 0.9 and binary_dice(both.labels == c, truth == c) > 0.9


def test_the_leave_one_out_estimate_is_reported_per_structure(scans):
    pairs = [(scans["a"], scans["a_lab"]), (scans["b"], scans["b_lab"])]
    result = ICLSegmenter(fill="registration", cross_check="full").segment(scans["q"], [p[0] for p in pairs],
                                                                          [p[1] for p in pairs])
    direct = leave_one_out(pairs, [1, 2])
    reported = {c.structure: c.dice["registration"] for c in result.checks}
    assert all(math.isclose(reported[c], direct[c], rel_tol=1e-9) for c in (1, 2)), (reported, direct)
    assert result.report()["structures"][0]["supports"] == 2


def test_registration_on_the_query_itself_needs_a_drawing(scans):
    """On the scan itself registration fills a drawing on a few slices (2D, between its slices); a label map that
    is not one is refused in one line, not carried onto itself."""
    with pytest.raises(InputError, match="registration read a scan's own annotated slices: .* a drawing on a few"):
        ICLSegmenter(fill="registration").segment(scans["a"], scans["a"], scans["a_lab"])


@pytest.fixture
def tracked(monkeypatch) -> dict:
    """What the model is given on the cross-scan road: frames, prompts, priors (the last run of the rule)."""
    import icl.infer.cross_memory as cross_memory

    seen: dict = {}
    real = segmenter.track

    def spy(predictor, frames, prompts, direction="both", **kw):
        seen.update(frames=len(frames), prompts=prompts, direction=direction, priors=kw.get("priors"))
        return real(predictor, frames, prompts, direction, **kw)

    monkeypatch.setattr(segmenter, "track", spy)  # where each road looks it up
    monkeypatch.setattr(cross_memory, "track", spy)
    torch.set_num_threads(1)
    return seen


@pytest.mark.parametrize("prior", ["auto", "none"])
def test_the_model_keeps_every_support_scans_slices_in_memory(scans, tracked, prior):
    result = ICLSegmenter(fill="model", support_slices=2, prior=prior).segment(
        scans["q"], [scans["a"], scans["b"]], [scans["a_lab"], scans["b_lab"]])
    prompted = sorted({z for per in tracked["prompts"].values() for z in per})
    assert result.mode == "prepended" and tracked["direction"] == "forward"
    assert tracked["frames"] == 24 + len(prompted) and len(prompted) > 2  # both scans' slices, then the query's 24


def test_a_model_trained_with_a_prior_gets_registration_as_prior_and_memory(scans, tracked):
    """#25 item 3: the default model records a mask prior; on another scan it gets the registered labels as the
    prior of every query slice and the support resampled onto the query's grid as its memory; --prior none: the
    model alone, the support's own slices and no prior."""
    registered = ICLSegmenter(fill="registration").segment(scans["q"], scans["a"], scans["a_lab"])
    result = ICLSegmenter(fill="model", support_slices=2).segment(scans["q"], scans["a"], scans["a_lab"])
    offset = tracked["frames"] - 24
    canon = np.moveaxis(registered.canonical_labels(), result.slice_axis, 0)
    assert sorted(tracked["priors"]) == [1, 2]
    for c in (1, 2):
        prior = tracked["priors"][c]
        assert sorted(prior) == list(range(offset, offset + 24))  # every query slice, no support slice
        assert [bool((prior[offset + z] > 0.5).any()) for z in range(24)] == [bool((canon[z] == c).any())
                                                                               for z in range(24)]
    # the memory: the support's slices on the query's grid, where registration put each structure
    assert offset == len(result.support_slices) > 0
    for i, z in enumerate(result.support_slices):
        for c in (1, 2):
            assert bool(np.asarray(tracked["prompts"][c][i]).any()) == bool((canon[z] == c).any())
    truth = np.asarray(nib.load(str(scans["q_lab"])).dataobj)
    assert all(binary_dice(result.labels == c, truth == c) > 0.8 for c in (1, 2))
    ICLSegmenter(fill="model", support_slices=2, prior="none").segment(scans["q"], scans["a"], scans["a_lab"])
    assert tracked["priors"] is None


def test_a_structure_registration_carries_nowhere_is_said_on_both_roads(scans, monkeypatch, capsys):
    import icl.infer.cross_memory as cross_memory

    cross_memory.warn_carried_nowhere(Path("q.nii.gz"), np.array([[[0, 1], [1, 0]]]), [1, 2])
    line = capsys.readouterr().err.strip()
    assert line.startswith("warning: q.nii.gz: registration carried structure(s) 2 nowhere") and "\n" not in line
    cross_memory.warn_carried_nowhere(Path("q.nii.gz"), np.array([[[2, 1]]]), [1, 2])
    assert capsys.readouterr().err == ""
    seen = []
    real = cross_memory.warn_carried_nowhere
    spy = lambda query, labels, classes: seen.append((query, sorted(np.unique(labels)))) or real(  # noqa: E731
        query, labels, classes)
    monkeypatch.setattr(cross_memory, "warn_carried_nowhere", spy)  # where registered_memory looks it up
    monkeypatch.setattr(segmenter, "warn_carried_nowhere", spy)  # where the registration road looks it up
    torch.set_num_threads(1)
    for fill in ("registration", "model"):
        ICLSegmenter(fill=fill, support_slices=2).segment(scans["q"], scans["a"], scans["a_lab"])
    assert [query.name for query, _ in seen] == ["q.nii.gz", "q.nii.gz"]
    assert all(values == [0, 1, 2] for _, values in seen)  # the fused labels each road gives


def test_the_model_road_gives_absent_not_an_error_where_registration_carries_nothing(scans, monkeypatch, capsys):
    """As the registration road: a warning naming the structures, and they are absent (never a guess)."""
    import icl.infer.cross_memory as cross_memory
    from icl.sparse.fusion import CarriedSupport

    def nothing(query, supports, classes):
        empty = np.zeros(query.canonical_shape, np.int32)
        return empty, [CarriedSupport(np.zeros(query.canonical_shape, np.float32), empty) for _ in supports]

    monkeypatch.setattr(cross_memory, "carry_supports", nothing)
    torch.set_num_threads(1)
    result = ICLSegmenter(fill="model", support_slices=2).segment(scans["q"], scans["a"], scans["a_lab"])
    assert not result.labels.any() and result.support_slices == []
    assert "registration carried structure(s) 1, 2 nowhere" in capsys.readouterr().err


def _cli(scans, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icl.segment", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_pairs_supports_in_order_and_refuses_mismatched_counts(scans):
    out, report = scans["root"] / "cli.nii.gz", scans["root"] / "cli.json"
    bad = _cli(scans, "--support", str(scans["a"]), "--support", str(scans["b"]), "--support-label",
               str(scans["a_lab"]), "--query", str(scans["q"]), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --support-label: 2 support scan(s) but 1 support label(s): give --support and --support-label once "
        "per support scan, in pairs"] and not out.exists()
    good = _cli(scans, "--support", str(scans["a"]), "--support-label", str(scans["a_lab"]), "--support",
                str(scans["b"]), "--support-label", str(scans["b_lab"]), "--query", str(scans["q"]), "--out", str(out),
                "--report", str(report), "--fill", "registration")
    assert good.returncode == 0, good.stderr
    lines = [line for line in good.stderr.splitlines() if line.startswith("structure ")]
    assert len(lines) == 2 and all(re.search(r"leave-one-out Dice registration [01]\.\d{3} ", line) for line in lines)
    assert "2 support scan(s)" in good.stderr.splitlines()[-1]
    assert [s["chosen"] for s in json.loads(report.read_text())["structures"]] == ["registration"] * 2
