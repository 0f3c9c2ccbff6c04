"""#33 in napari: the reader opens every format as its NIfTI copy (a DICOM series folder too), a 3D Slicer
segmentation as a Labels layer with its segment names and colours, and the writer saves a Labels layer back as a
.seg.nrrd that keeps them (read back by slicerio, the Slicer team's reader)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import slicerio
from napari.layers import Image, Labels
from npe2 import PluginManager, PluginManifest

from bench.format_writers import segment, write_dicom_series, write_metaimage, write_nifti, write_nrrd, write_seg_nrrd
from format_fixtures import dicom_affine, image_volume, label_volume, oblique_affine
from icl.napari.reader import SEGMENTS, get_reader, read_scans

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def plugin():
    assert os.environ.get("DISPLAY"), "no X display (pytest-xvfb starts Xvfb)"
    manager = PluginManager.instance()
    if "icl-sam2" not in manager:
        manager.register(PluginManifest.from_file(ROOT / "icl/napari/napari.yaml"))
    yield


@pytest.fixture
def files(tmp_path):
    affine, image = oblique_affine(), image_volume()
    labels = label_volume()
    segments = [segment("liver", "Liver", 1, color=(0.9, 0.5, 0.1)), segment("kidney", "Kidney", 2),
                segment("tumor", "Tumour", 5, color=(1.0, 0.0, 0.0))]
    dicom_image = image_volume((12, 10, 7))
    return {"nifti": write_nifti(image, affine, tmp_path / "scan.nii.gz"),
            "nrrd": write_nrrd(image, affine, tmp_path / "scan.nrrd"),
            "mha": write_metaimage(image, affine, tmp_path / "scan.mha"),
            "seg": write_seg_nrrd(labels, affine, tmp_path / "drawn.seg.nrrd", segments),
            "dicom_nifti": write_nifti(dicom_image, dicom_affine(), tmp_path / "ct.nii.gz"),
            "dicom": write_dicom_series(dicom_image, dicom_affine(), tmp_path / "CT"), "labels": labels}


def test_reader_opens_every_format_as_its_nifti_copy(files):
    (reference, ref_kw, kind), = read_scans(str(files["nifti"]))
    assert kind == "image"
    for key in ("nrrd", "mha"):
        assert get_reader(str(files[key])) is read_scans
        (data, kw, kind), = read_scans(str(files[key]))
        assert kind == "image" and kw["name"] == "scan"
        np.testing.assert_array_equal(data, reference)
        np.testing.assert_allclose(kw["scale"], ref_kw["scale"], atol=1e-5)
        np.testing.assert_allclose(kw["translate"], ref_kw["translate"], atol=1e-5)
    assert get_reader(str(files["dicom"])) is read_scans  # a folder: its DICOM series
    (ct, ct_kw, kind), = read_scans(str(files["dicom"]))
    (ct_ref, ct_ref_kw, _), = read_scans(str(files["dicom_nifti"]))
    assert kind == "image" and ct_kw["name"] == "CT"
    np.testing.assert_array_equal(ct, ct_ref)
    np.testing.assert_allclose(ct_kw["scale"], ct_ref_kw["scale"], atol=1e-5)
    assert get_reader(str(files["dicom"].parent / "notes.txt")) is None


def test_seg_nrrd_opens_as_named_labels_and_saves_back_with_its_names(make_napari_viewer, files, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.open(str(files["seg"]), plugin="icl-sam2")[0]
    assert isinstance(layer, Labels) and layer.name == "drawn"
    features = layer.features.set_index("index")["name"].to_dict()
    assert features == {0: "background", 1: "Liver", 2: "Kidney", 5: "Tumour"}
    np.testing.assert_allclose(layer.colormap.color_dict[1], (0.9, 0.5, 0.1, 1.0))
    assert [s.name for s in layer.metadata[SEGMENTS]] == ["Liver", "Kidney", "Tumour"]
    layer.data[0, 0, 0] = 7  # a structure drawn in napari: no name yet, its number kept
    out = tmp_path / "saved.seg.nrrd"
    layer.save(str(out), plugin="icl-sam2")
    seg = slicerio.read_segmentation(str(out))
    names = {s["labelValue"]: s["name"] for s in seg["segments"]}
    assert names == {1: "Liver", 2: "Kidney", 5: "Tumour", 7: "Segment_7"}
    saved = seg["voxels"]
    assert set(np.unique(saved)) == {0, 1, 2, 5, 7} and int((saved == 7).sum()) == 1
    np.testing.assert_array_equal(saved[saved != 7], files["labels"][saved != 7])  # the file's voxel order kept
    image = viewer.open(str(files["nrrd"]), plugin="icl-sam2")[0]
    assert isinstance(image, Image)
