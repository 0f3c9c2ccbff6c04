"""#33: every format is read as the NIfTI reader reads it (array, affine to 1e-5, the canonical view the engine
slices) and written so that another library reads back the same labels, grid and segment names. Files are written
by other libraries than the readers' (tests/format_fixtures.py)."""
from __future__ import annotations

import nrrd
import numpy as np
import pytest
import slicerio

from bench.format_writers import (nrrd_geometry, read_dicom_values, read_metaimage, segment, write_dicom_series,
                                  write_metaimage, write_nifti, write_nrrd, write_seg_nrrd)
from format_fixtures import dicom_affine, image_volume, label_volume, oblique_affine
from icl.data.formats import files_of, format_of, output_name
from icl.data.formats.slicer import Segment
from icl.data.frames import Scan
from icl.infer.scan_source import canonical_affine
from icl.report.label_map import write_label_map

AFFINE_TOL = 1e-5


def _same_as_nifti(scan: Scan, reference: Scan) -> None:
    """What the NIfTI reader yields: the file's array and affine, and so the same canonical view and spacing."""
    np.testing.assert_array_equal(np.asarray(scan.raw), np.asarray(reference.raw))
    np.testing.assert_allclose(scan.affine, reference.affine, atol=AFFINE_TOL)
    assert scan.canonical_shape == reference.canonical_shape
    np.testing.assert_array_equal(np.asarray(scan.canonical), np.asarray(reference.canonical))
    np.testing.assert_allclose(canonical_affine(scan), canonical_affine(reference), atol=AFFINE_TOL)


@pytest.fixture
def grid(tmp_path):
    affine = oblique_affine()
    image = image_volume()
    return {"affine": affine, "image": image, "nifti": Scan.open(write_nifti(image, affine, tmp_path / "ref.nii.gz"))}


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
def test_nrrd_written_by_pynrrd_reads_as_its_nifti_copy(grid, tmp_path, space):
    path = write_nrrd(grid["image"], grid["affine"], tmp_path / "scan.nrrd", space=space)
    assert format_of(path) == "nrrd"
    _same_as_nifti(Scan.open(path), grid["nifti"])


def test_detached_nrrd_header_reads_with_its_data_file(grid, tmp_path):
    path = tmp_path / "scan.nhdr"
    nrrd.write(str(path), grid["image"], {**nrrd_geometry(grid["affine"]), "kinds": ["domain"] * 3,
                                            "encoding": "raw"}, detached_header=True, index_order="F")
    _same_as_nifti(Scan.open(path), grid["nifti"])
    assert files_of(path) == [path, tmp_path / "scan.raw"]


@pytest.mark.parametrize("name", ["scan.mha", "scan.mhd"])
def test_metaimage_written_by_hand_reads_as_its_nifti_copy(grid, tmp_path, name):
    path = write_metaimage(grid["image"], grid["affine"], tmp_path / name)
    assert format_of(path) == "metaimage"
    _same_as_nifti(Scan.open(path), grid["nifti"])
    if name.endswith(".mhd"):  # the data file is part of the image (outputs are checked against both)
        assert files_of(path) == [path, tmp_path / "scan.raw"]


def test_dicom_series_by_pydicom_sorted_by_position_and_rescaled(tmp_path):
    affine = dicom_affine()
    values = image_volume((12, 10, 7)).astype(np.float32) * 0.5 - 1024  # what slope 0.5, intercept -1024 store
    folder = write_dicom_series(values, affine, tmp_path / "CT", slope=0.5, intercept=-1024)
    reference = Scan.open(write_nifti(values, affine, tmp_path / "ref.nii.gz"))
    for given in (folder, folder / "IM0003"):  # the folder, or one of its files: the same series
        scan = Scan.open(given)
        assert format_of(given) == "dicom"
        assert scan.raw.dtype == np.float32  # a fractional slope: values, not stored integers
        _same_as_nifti(scan, reference)
    # the last file holds the first slice: order comes from positions, not names or instance numbers
    np.testing.assert_array_equal(read_dicom_values(folder / "IM0006"), values[:, :, 0].T)


def test_dicom_gantry_tilt_is_resampled_and_said(tmp_path, capsys):
    affine = dicom_affine()
    volume = image_volume((12, 10, 6)).astype(np.float32)
    stored = np.full_like(volume, volume.min())
    n_i = volume.shape[0]
    for k in range(volume.shape[2]):  # slice k placed k columns further along i: its pixels hold volume shifted
        stored[: n_i - k, :, k] = volume[k:, :, k]
    column = np.array([0.7, 0.0, 0.0])  # LPS: one column spacing along i (i runs to patient left: LPS +x)
    folder = write_dicom_series(stored, affine, tmp_path / "tilted", tilt_mm_per_slice=column)
    scan = Scan.open(folder)
    err = capsys.readouterr().err
    assert "gantry tilt of" in err and "resampled onto a rectangular grid" in err and str(folder) in err
    np.testing.assert_allclose(scan.affine, affine, atol=AFFINE_TOL)  # the first slice's rectangular grid
    raw = np.asarray(scan.raw)
    for k in range(volume.shape[2]):
        np.testing.assert_allclose(raw[k:, :, k], volume[k:, :, k], atol=1e-4)


def test_slicer_segmentation_layers_merged_with_names_colours_values(grid, tmp_path):
    labels = label_volume()
    layers = np.zeros((2, *labels.shape), np.uint8)
    layers[0][labels == 1] = 1
    layers[0][labels == 2] = 2
    layers[1][labels == 5] = 1  # another layer reuses value 1
    segments = [segment("liver", "Liver", 1, 0, (0.9, 0.5, 0.1)), segment("kidney", "Kidney left", 2, 0),
                segment("tumor", "Tumour", 1, 1, (1.0, 0.0, 0.0))]
    path = write_seg_nrrd(layers, grid["affine"], tmp_path / "drawn.seg.nrrd", segments)
    scan = Scan.open(path)
    np.testing.assert_allclose(scan.affine, grid["affine"], atol=AFFINE_TOL)
    names = {s.name: s for s in scan.segments}
    assert list(names) == ["Liver", "Kidney left", "Tumour"]
    assert names["Liver"].value == 1 and names["Kidney left"].value == 2
    assert names["Tumour"].value == 3 and names["Tumour"].layer == 1  # value 1 was taken: the next free one
    assert names["Liver"].color == pytest.approx((0.9, 0.5, 0.1))
    expected = labels.copy()
    expected[labels == 5] = 3
    np.testing.assert_array_equal(np.asarray(scan.raw), expected)


def test_written_seg_nrrd_keeps_segments_and_reads_in_slicerio_and_pynrrd(grid, tmp_path):
    labels = label_volume()
    known = (Segment(2, "Kidney left", (0.25, 0.5, 0.75), "kidney", "TerminologyEntry:ctx~SCT^1^A~SCT^2^B~^^~~^^~^^"),)
    out = write_label_map(labels, grid["affine"], None, tmp_path / "filled.seg.nrrd", segments=known)
    # slicerio: the Slicer team's reader of Slicer's segmentation format
    seg = slicerio.read_segmentation(str(out))
    by_value = {s["labelValue"]: s for s in seg["segments"]}
    assert sorted(by_value) == [1, 2, 5]
    assert by_value[2]["name"] == "Kidney left" and by_value[2]["id"] == "kidney"
    assert by_value[2]["color"] == pytest.approx([0.25, 0.5, 0.75])
    assert by_value[2]["terminology"]["category"] == ["SCT", "1", "A"]  # its terminology, verbatim
    assert by_value[5]["name"] == "Segment_5"  # a value no input named: its number kept
    assert all(s["layer"] == 0 for s in seg["segments"])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(lps_to_ras @ seg["ijkToLPS"], grid["affine"], atol=AFFINE_TOL)
    np.testing.assert_array_equal(seg["voxels"], labels)
    # pynrrd: the header fields Slicer's storage node reads
    data, header = nrrd.read(str(out))
    assert header["kinds"] == ["domain"] * 3 and header["space"] == "left-posterior-superior"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    n = next(i for i in range(3) if header[f"Segment{i}_LabelValue"] == "2")
    assert header[f"Segment{n}_Extent"] == "7 11 5 8 3 6" and header[f"Segment{n}_Layer"] == "0"
    # and our own reader: the same names back
    assert [s.name for s in Scan.open(out).segments] == ["Kidney left", "Segment_1", "Segment_5"]  # named first


@pytest.mark.parametrize("name", ["out.nrrd", "out.mha", "out.mhd", "out.nii.gz"])
def test_label_map_writer_round_trips_through_other_libraries(grid, tmp_path, name):
    labels = label_volume()
    header = grid["nifti"].header
    out = write_label_map(labels, grid["affine"], header, tmp_path / name)
    if name.endswith(".nrrd"):
        data, fields = nrrd.read(str(out))
        lps = np.diag([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(lps @ fields["space directions"].T, grid["affine"][:3, :3], atol=AFFINE_TOL)
        np.testing.assert_allclose(lps @ fields["space origin"], grid["affine"][:3, 3], atol=AFFINE_TOL)
    elif name.endswith((".mha", ".mhd")):
        fields, raw = read_metaimage(out)
        assert fields["DimSize"] == " ".join(map(str, labels.shape))
        data = np.frombuffer(raw, np.uint8).reshape(labels.shape, order="F")
    else:
        import nibabel as nib
        data = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(data, labels)
    scan = Scan.open(out)
    np.testing.assert_array_equal(np.asarray(scan.raw), labels)
    np.testing.assert_allclose(scan.affine, grid["affine"], atol=AFFINE_TOL)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == []  # temp files renamed, temp folders gone


def test_output_names_follow_the_query(tmp_path):
    assert output_name(tmp_path / "q.nrrd") == "q.nrrd"
    assert output_name(tmp_path / "q.nhdr") == "q.nrrd"
    assert output_name(tmp_path / "q.mha") == "q.mha"
    assert output_name(tmp_path / "CT_series") == "CT_series.nii.gz"
    assert output_name(tmp_path / "IM0001.dcm") == "IM0001.nii.gz"
