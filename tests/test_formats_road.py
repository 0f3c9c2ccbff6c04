"""#33 through the CLI and the API: a scan and its drawing in each format (written by other libraries) filled
exactly as their NIfTI copies are, the output in the format --out names, a Slicer segmentation's names, colours
and label values kept in a .seg.nrrd output; query folders of mixed formats with a DICOM series sub-folder."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import slicerio

from bench.format_writers import segment, write_dicom_series, write_metaimage, write_nifti, write_nrrd, write_seg_nrrd
from format_fixtures import oblique_affine
from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.data.frames import Scan
from safety_fixtures import dice, draw, make_volume

NAMES = {1: ("liver", "Liver", (0.85, 0.4, 0.2)), 2: ("kidney", "Kidney left", (0.2, 0.6, 0.9)),
         3: ("tumor", "Tumour", (1.0, 0.1, 0.1))}
SLOPE, INTERCEPT = 0.25, -100.0  # the DICOM copy's rescale: its values are the image quantised to quarters


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The scan and its drawing (every 4th slice per structure) in every format, on an oblique, permuted grid whose
    DICOM copy reads its slices in the other order (its slice normal runs against the file's k axis)."""
    root = tmp_path_factory.mktemp("formats_road")
    image, label = make_volume()
    image = image.astype(np.float32)
    affine = oblique_affine(spacing=(0.9, 1.1, 1.6))
    drawn = draw(label, axis=2).astype(np.uint8)
    quantised = (np.round((image - INTERCEPT) / SLOPE) * SLOPE + INTERCEPT).astype(np.float32)
    segments = [segment(sid, name, v, color=rgb) for v, (sid, name, rgb) in NAMES.items()]
    return {
        "label": label, "affine": affine,
        "nifti": (write_nifti(image, affine, root / "scan.nii.gz"), write_nifti(drawn, affine, root / "drawn.nii.gz")),
        "nrrd": (write_nrrd(image, affine, root / "scan.nrrd"), write_seg_nrrd(drawn, affine, root / "drawn.seg.nrrd",
                                                                                segments)),
        "mha": (write_metaimage(image, affine, root / "scan.mha"), write_metaimage(drawn, affine, root / "drawn.mha")),
        "mhd": (write_metaimage(image, affine, root / "scan.mhd"), write_nrrd(drawn, affine, root / "drawn.nrrd")),
        "quantised": (write_nifti(quantised, affine, root / "q.nii.gz"), root / "drawn.nii.gz"),
        "dicom": (write_dicom_series(quantised, affine, root / "CT", SLOPE, INTERCEPT), root / "drawn.nrrd"),
    }


def _fill(scan, label, out, *extra) -> int:
    return main(["--support", str(scan), "--support-label", str(label), "--query", str(scan), "--out", str(out),
                 "--fill", "interpolation", "--quiet", *extra])


def _canonical(path) -> np.ndarray:
    return np.asarray(Scan.open(path).canonical)


@pytest.fixture(scope="module")
def nifti_fills(case, tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti_fills")
    outs = {}
    for key in ("nifti", "quantised"):
        assert _fill(*case[key], root / f"{key}.nii.gz") == 0
        outs[key] = _canonical(root / f"{key}.nii.gz")
    return outs


@pytest.mark.parametrize("fmt, out_name", [("nrrd", "filled.seg.nrrd"), ("mha", "filled.mha"),
                                           ("mhd", "filled.mhd"), ("dicom", "filled.nii.gz")])
def test_each_format_fills_as_its_nifti_copy_through_the_cli(case, nifti_fills, tmp_path, capsys, fmt, out_name):
    out = tmp_path / out_name
    assert _fill(*case[fmt], out) == 0
    assert "error" not in capsys.readouterr().err
    reference = nifti_fills["quantised" if fmt == "dicom" else "nifti"]
    filled = _canonical(out)
    np.testing.assert_array_equal(filled, reference)  # the same labels, voxel for voxel: the same Dice
    truth = np.asarray(Scan.from_array(case["label"], case["affine"]).canonical)
    for c in NAMES:
        assert dice(filled == c, truth == c) == dice(reference == c, truth == c) > 0.7
    if fmt != "dicom":  # written on the query's own grid (its voxel order and affine)
        np.testing.assert_allclose(Scan.open(out).affine, case["affine"], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out_name] + (["filled.zraw"] if fmt == "mhd" else [])


def test_seg_nrrd_names_colours_and_values_survive_the_fill(case, tmp_path):
    out = tmp_path / "filled.seg.nrrd"
    assert _fill(*case["nrrd"], out) == 0
    seg = slicerio.read_segmentation(str(out))
    got = {s["labelValue"]: (s["id"], s["name"], tuple(s["color"])) for s in seg["segments"]}
    assert got.keys() == NAMES.keys()
    for value, (sid, name, rgb) in NAMES.items():
        assert got[value][:2] == (sid, name) and got[value][2] == pytest.approx(rgb)
    # the NIfTI drawing has no names: a .seg.nrrd output names each structure by its number, as Slicer does
    plain = tmp_path / "plain.seg.nrrd"
    assert _fill(*case["nifti"], plain) == 0
    assert [s["name"] for s in slicerio.read_segmentation(str(plain), skip_voxels=True)["segments"]] == \
        ["Segment_1", "Segment_2", "Segment_3"]


def test_api_reads_and_writes_every_format(case, nifti_fills, tmp_path):
    seg = ICLSegmenter(fill="interpolation")
    scan, drawn = case["nrrd"]
    result = seg.segment(query=scan, support=scan, support_label=drawn)
    assert [s.name for s in result.segments] == ["Liver", "Kidney left", "Tumour"]
    for name in ("api.seg.nrrd", "api.mha", "api.nii.gz"):
        np.testing.assert_array_equal(_canonical(seg.save(result, tmp_path / name)), nifti_fills["nifti"])
    assert [s.name for s in Scan.open(tmp_path / "api.seg.nrrd").segments] == ["Liver", "Kidney left", "Tumour"]
    with pytest.raises(Exception, match="same file"):  # never over an input: the drawing itself
        seg.save(result, drawn)


def test_query_folder_of_mixed_formats_with_a_dicom_series(case, nifti_fills, tmp_path, capsys):
    folder = tmp_path / "queries"
    folder.mkdir()
    shutil.copy(case["nrrd"][0], folder / "a.nrrd")
    shutil.copy(case["mha"][0], folder / "b.mha")
    shutil.copytree(case["dicom"][0], folder / "CT")
    shutil.copy(case["nrrd"][1], folder / "drawn.seg.nrrd")
    (folder / "notes.txt").write_text("scanned on Tuesday")
    out = tmp_path / "out"
    assert main(["--support", str(case["nifti"][0]), "--support-label", str(case["nifti"][1]), "--query",
                 str(folder), "--out", str(out), "--fill", "interpolation", "--direction", "both", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "drawn.seg.nrrd (a 3D Slicer segmentation (a label map))" in err and "notes.txt (not a scan file)" in err
    assert sorted(p.name for p in out.iterdir()) == ["CT.nii.gz", "a.nrrd", "b.mha"]
    for name in ("a.nrrd", "b.mha", "CT.nii.gz"):
        np.testing.assert_array_equal(_canonical(out / name), nifti_fills["nifti"])


def test_the_readmes_slicer_path_runs_as_written(case, tmp_path):
    """The README's 'A 3D Slicer user, end to end' commands, on the case saved as Slicer saves it."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("**A 3D Slicer user, end to end.**")
    block = re.search(r"```bash\n(.*?)```", readme[start:], flags=re.S).group(1)
    commands = [line.split() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["python", "-m", "icl.segment"]] * 2
    shutil.copy(case["nrrd"][0], tmp_path / "scan.nrrd")
    shutil.copy(case["nrrd"][1], tmp_path / "Segmentation.seg.nrrd")
    shutil.copytree(case["dicom"][0], tmp_path / "CT")
    for args in commands:
        out = tmp_path / args[args.index("--out") + 1]
        args = [str(tmp_path / a) if (tmp_path / a.rstrip("/")).exists() or a == args[args.index("--out") + 1]
                else a for a in args[3:]]
        assert main([*args, "--quiet"]) == 0
        seg = slicerio.read_segmentation(str(out))
        assert [s["name"] for s in seg["segments"]] == ["Liver", "Kidney left", "Tumour"]
        assert all((seg["voxels"] == v).sum() > 0 for v in NAMES)
