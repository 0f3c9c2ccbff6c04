"""#33 on a real scan: INIA19 (read from its path, never copied into the repository; skipped when absent) and the
development protocol's drawing (the ten structures, each on every 6th slice of its own extent) converted in the
test to NRRD + a Slicer segmentation (names), MetaImage and a DICOM series (int16 with a rescale slope), filled
through the CLI and the API: the same labels voxel for voxel as the NIfTI copies, so the same Dice to the last
digit, and the segment names back in the .seg.nrrd output."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicerio

from bench.format_writers import segment, write_dicom_series, write_metaimage, write_nifti, write_nrrd, write_seg_nrrd
from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.data.frames import Scan
from icl.sparse.protocol import annotate_sparse, sparse_dice

INIA19 = Path(os.environ.get("ICL_INIA19", "/work/shared/data/inia19"))
T1, ATLAS = INIA19 / "inia19-t1-brain.nii.gz", INIA19 / "inia19-NeuroMaps.nii.gz"
STRUCTURES = [1, 1001, 147, 1147, 45, 1045, 37, 1037, 7, 1007]  # the protocol's ten (its README)
STEP = 6
SLOPE = 1 / 64  # the DICOM copy stores the T1 (0 … 383) as int16 in 64ths: exact in float32

pytestmark = pytest.mark.skipif(not (T1.is_file() and ATLAS.is_file()), reason=f"INIA19 not found at {INIA19}")


@pytest.fixture(scope="module")
def inia(tmp_path_factory):
    root = tmp_path_factory.mktemp("inia19")
    t1 = nib.load(str(T1))
    image, affine = np.asarray(t1.dataobj, dtype=np.float32), t1.affine
    atlas = np.asarray(nib.load(str(ATLAS)).dataobj)
    truth = np.where(np.isin(atlas, STRUCTURES), atlas, 0).astype(np.int16)
    drawn, annotated = annotate_sparse(truth, STRUCTURES, STEP)
    quantised = (np.round(image / SLOPE) * SLOPE).astype(np.float32)
    segments = [segment(f"s{v}", f"NeuroMaps {v}", v, color=((v % 7) / 7, (v % 5) / 5, (v % 3) / 3))
                for v in STRUCTURES]
    return {"truth": truth, "annotated": annotated, "affine": affine,
            "nifti": (T1, write_nifti(drawn, affine, root / "drawn.nii.gz")),
            "nrrd": (write_nrrd(image, affine, root / "t1.nrrd"),
                     write_seg_nrrd(drawn, affine, root / "drawn.seg.nrrd", segments)),
            "mha": (write_metaimage(image, affine, root / "t1.mha"),
                    write_metaimage(drawn, affine, root / "drawn.mha")),
            "quantised": (write_nifti(quantised, affine, root / "t1_q.nii.gz"), root / "drawn.nii.gz"),
            "dicom": (write_dicom_series(quantised, affine, root / "T1", slope=SLOPE, modality="MR"),
                      root / "drawn.nii.gz")}


def _fill_cli(scan, label, out) -> np.ndarray:
    assert main(["--support", str(scan), "--support-label", str(label), "--query", str(scan), "--out", str(out),
                 "--fill", "interpolation", "--quiet"]) == 0
    return np.asarray(Scan.open(out).canonical)


def test_inia19_every_format_gives_the_nifti_copys_labels_and_dice(inia, tmp_path):
    reference = {key: _fill_cli(*inia[key], tmp_path / f"{key}.nii.gz") for key in ("nifti", "quantised")}
    truth = np.asarray(Scan.from_array(inia["truth"], inia["affine"]).canonical)
    scores = {key: sparse_dice(out, truth, STRUCTURES, inia["annotated"]) for key, out in reference.items()}
    assert np.nanmean(list(scores["nifti"].values())) > 0.7  # the fill worked (interpolation @6: 0.77 measured)
    for fmt, out_name in (("nrrd", "filled.seg.nrrd"), ("mha", "filled.mha"), ("dicom", "filled.nrrd")):
        # the scan itself reads as its NIfTI copy (what any fill, the model's included, is given)
        copy = Scan.open(inia["quantised" if fmt == "dicom" else "nifti"][0])
        np.testing.assert_array_equal(np.asarray(Scan.open(inia[fmt][0]).canonical), np.asarray(copy.canonical))
        filled = _fill_cli(*inia[fmt], tmp_path / out_name)
        ref = reference["quantised" if fmt == "dicom" else "nifti"]
        np.testing.assert_array_equal(filled, ref)
        assert sparse_dice(filled, truth, STRUCTURES, inia["annotated"]) == \
            scores["quantised" if fmt == "dicom" else "nifti"]
    seg = slicerio.read_segmentation(str(tmp_path / "filled.seg.nrrd"), skip_voxels=True)
    assert {s["labelValue"]: s["name"] for s in seg["segments"]} == {v: f"NeuroMaps {v}" for v in STRUCTURES}


def test_inia19_through_the_api_in_every_format(inia, tmp_path):
    seg = ICLSegmenter(fill="interpolation")
    reference = seg.segment(*[str(p) for p in (inia["nifti"][0], *inia["nifti"])])
    result = seg.segment(query=inia["nrrd"][0], support=inia["nrrd"][0], support_label=inia["nrrd"][1])
    np.testing.assert_array_equal(result.canonical_labels(), reference.canonical_labels())
    for name in ("api.seg.nrrd", "api.mhd"):
        saved = seg.save(result, tmp_path / name)
        np.testing.assert_array_equal(np.asarray(Scan.open(saved).canonical), reference.canonical_labels())
    assert [s.name for s in Scan.open(tmp_path / "api.seg.nrrd").segments] == [f"NeuroMaps {v}" for v in STRUCTURES]
