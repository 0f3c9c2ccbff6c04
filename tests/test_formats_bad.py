"""#33: each bad input of another format is one line naming the file (exit 2, no traceback) and no output — a
truncated NRRD, a DICOM folder with no image, two series, images of mixed sizes, two images at one position, a
missing slice, a label on another grid, a Slicer segmentation whose segments overlap (in one layer, or across
layers), an output that would overwrite an input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.format_writers import segment, write_dicom_series, write_metaimage, write_nifti, write_nrrd, write_seg_nrrd
from format_fixtures import dicom_affine, image_volume, label_volume
from icl.cli.segment import main

SHAPE = (14, 11, 9)


@pytest.fixture
def ok(tmp_path):
    """A good scan (NIfTI), its drawing, and a DICOM series of another scan on an axial grid."""
    affine = dicom_affine()
    image, labels = image_volume(SHAPE), label_volume(SHAPE)
    drawn = np.zeros_like(labels)
    drawn[:, :, 1::2] = labels[:, :, 1::2]  # each structure on two slices or more
    return {"affine": affine, "image": image, "labels": labels,
            "scan": write_nifti(image, affine, tmp_path / "scan.nii.gz"),
            "drawn": write_nifti(drawn, affine, tmp_path / "drawn.nii.gz"), "drawn_array": drawn}


def _refused(capsys, tmp_path, where, needle, support, label, query, out_name="out.nii.gz", before=None):
    """The run exits 2 with one line 'error: <where>: ...<needle>...' and writes nothing."""
    before = before if before is not None else sorted(p.name for p in tmp_path.rglob("*"))
    rc = main(["--support", str(support), "--support-label", str(label), "--query", str(query),
               "--out", str(tmp_path / "out" / out_name), "--fill", "interpolation", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    # one error line, the last; before it at most the notes of what was read so far (the data of a truncated file
    # is read when it is needed: a note on the drawing may come first)
    assert err and err[-1].startswith(f"error: {where}") and needle in err[-1], err
    assert all(line.startswith("note: ") for line in err[:-1]), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no temp file, no folder


def test_truncated_nrrd_as_query_and_as_label(ok, tmp_path, capsys):
    for encoding in ("gzip", "raw"):
        scan = write_nrrd(ok["image"], ok["affine"], tmp_path / f"scan_{encoding}.nrrd", encoding=encoding)
        scan.write_bytes(scan.read_bytes()[:-200])
        _refused(capsys, tmp_path, scan, "truncated NRRD data", scan, ok["drawn"], scan)
    label = write_seg_nrrd(ok["drawn_array"], ok["affine"], tmp_path / "drawn.seg.nrrd", [segment("a", "A", 1)])
    label.write_bytes(label.read_bytes()[:-8])  # the end of its gzip stream
    _refused(capsys, tmp_path, label, "truncated segmentation data", ok["scan"], label, ok["scan"])


def test_dicom_folder_with_no_image(ok, tmp_path, capsys):
    folder = tmp_path / "report"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # a structured report: no pixel data
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.PatientName = "SR", generate_uid(), "Phantom"
    ds.save_as(str(folder / "SR0001"), enforce_file_format=True)
    _refused(capsys, tmp_path, folder, "no DICOM image in this folder", ok["scan"], ok["drawn"], folder)


def test_two_series_listed_and_one_picked_by_a_file(ok, tmp_path, capsys):
    folder = tmp_path / "exam"
    write_dicom_series(ok["image"], ok["affine"], folder, description="AX T1", names=[f"A{i}" for i in range(9)])
    write_dicom_series(ok["image"] + 5, ok["affine"], folder, description="AX T2", names=[f"B{i}" for i in range(9)])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _refused(capsys, tmp_path, folder, "2 DICOM series in one folder: 'AX T1'", ok["scan"], ok["drawn"], folder,
             before=before)
    assert main(["--support", str(ok["scan"]), "--support-label", str(ok["drawn"]), "--query", str(folder / "B3"),
                 "--out", str(tmp_path / "t2.nii.gz"), "--fill", "interpolation", "--direction", "both",
                 "--quiet"]) == 0  # one file names its series
    assert (tmp_path / "t2.nii.gz").exists()


@pytest.mark.parametrize("damage, needle", [
    ("size", "mixes image sizes (10x11, 14x11)"),
    ("position", "2 images share a slice position"),
    ("missing", "slice spacing varies from 2 to 4 mm"),
])
def test_a_series_that_is_not_one_volume(ok, tmp_path, capsys, damage, needle):
    folder = write_dicom_series(ok["image"], ok["affine"], tmp_path / "CT")
    files = sorted(folder.iterdir())
    if damage == "size":  # one slice of another size
        other = write_dicom_series(ok["image"][:10], ok["affine"], tmp_path / "small",
                                   series_uid=_series_of(files[0]))
        shutil.copy(sorted(other.iterdir())[4], folder / "IM9999")
        (folder / files[4].name).unlink()
    elif damage == "position":  # the same slice twice
        shutil.copy(files[2], folder / "IM9999")
        _new_instance(folder / "IM9999")
    else:  # a slice missing in the middle
        files[4].unlink()
    _refused(capsys, tmp_path, folder, needle, ok["scan"], ok["drawn"], folder)


def _series_of(path) -> str:
    import pydicom
    return str(pydicom.dcmread(str(path)).SeriesInstanceUID)


def _new_instance(path) -> None:
    import pydicom
    ds = pydicom.dcmread(str(path))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(str(path), enforce_file_format=True)


def test_label_on_another_grid(ok, tmp_path, capsys):
    shifted = ok["affine"].copy()
    shifted[:3, 3] += (1.5, 0.0, 0.0)
    label = write_nrrd(ok["drawn_array"], shifted, tmp_path / "drawn.nrrd")
    _refused(capsys, tmp_path, label, "the label is on another grid", ok["scan"], label, ok["scan"])
    cropped = write_metaimage(ok["drawn_array"][:-2], ok["affine"], tmp_path / "cropped.mha")
    _refused(capsys, tmp_path, cropped, "does not match image shape", ok["scan"], cropped, ok["scan"])


def test_overlapping_segments_in_one_layer_and_across_layers(ok, tmp_path, capsys):
    labels = ok["drawn_array"]
    same_value = write_seg_nrrd(labels, ok["affine"], tmp_path / "same.seg.nrrd",
                                [segment("a", "Liver", 1), segment("b", "Tumour", 1)])
    _refused(capsys, tmp_path, same_value, "segments 'Liver' and 'Tumour' overlap in layer 0", ok["scan"],
             same_value, ok["scan"])
    layers = np.stack([(labels == 1).astype(np.uint8), (labels > 0).astype(np.uint8)])  # layer 1 covers layer 0
    across = write_seg_nrrd(layers, ok["affine"], tmp_path / "across.seg.nrrd",
                            [segment("a", "Liver", 1, 0), segment("b", "Organ", 1, 1)])
    _refused(capsys, tmp_path, across, "segments 'Liver' (layer 0) and 'Organ' (layer 1) overlap on", ok["scan"],
             across, ok["scan"])


def test_an_output_that_is_an_input_or_of_no_format(ok, tmp_path, capsys):
    label = write_seg_nrrd(ok["drawn_array"], ok["affine"], tmp_path / "drawn.seg.nrrd", [segment("a", "A", 1)])
    before = label.read_bytes()
    rc = main(["--support", str(ok["scan"]), "--support-label", str(label), "--query", str(ok["scan"]),
               "--out", str(label), "--fill", "interpolation", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "are the same file" in err[0] and label.read_bytes() == before
    scan = write_metaimage(ok["image"], ok["affine"], tmp_path / "scan.mhd")  # its data file, renamed: b.zraw
    (tmp_path / "scan.raw").rename(tmp_path / "b.zraw")
    scan.write_text(scan.read_text().replace("ElementDataFile = scan.raw", "ElementDataFile = b.zraw"))
    data = (tmp_path / "b.zraw").read_bytes()
    rc = main(["--support", str(scan), "--support-label", str(ok["drawn"]), "--query", str(scan),
               "--out", str(tmp_path / "b.mhd"), "--fill", "interpolation", "--quiet"])  # it would write b.zraw
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "b.zraw: --out and --support are the same file" in err[0], err
    assert (tmp_path / "b.zraw").read_bytes() == data and not (tmp_path / "b.mhd").exists()
    _refused(capsys, tmp_path, tmp_path / "out" / "pred.tif", "not a label-map file name", ok["scan"], ok["drawn"],
             ok["scan"], out_name="pred.tif")
