"""The napari plugin (icl/napari) in a real viewer: reader, writer and the "In-context fill" widget.

Headless under Xvfb (pytest-xvfb starts it; napari's canvas needs OpenGL, which Qt's offscreen platform lacks).
The widget runs the shipped default model on a small phantom drawn on every 4th slice and must give exactly what
``icl.api`` gives for the same files.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image, Labels
from napari.utils.notifications import notification_manager
from npe2 import PluginManager, PluginManifest

from icl.api import ICLSegmenter
from icl.data.frames import Scan
from icl.data.phantom import make_case
from icl.errors import InputError
from icl.napari.grid import Grid
from icl.napari.job import FillJob, FillRequest, FillResult, Layer, one_line
from icl.napari.reader import get_reader, read_scans
from icl.napari.widget import TABLE, FillWidget
from icl.progress import observe
from icl.sparse.protocol import annotate_sparse

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "icl/napari/napari.yaml"
SHAPE = (32, 28, 36)  # seed 4: each structure drawn on 3 slices, so the self-check holds one out
CLASSES = [1, 2]
EVERY = 4
FILL_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module", autouse=True)
def plugin():
    """The plugin as napari finds it: installed (``pip install -e .`` registers the entry point), or registered
    here from the same manifest when this tree is not the installed one."""
    assert os.environ.get("DISPLAY"), "no X display: napari's canvas needs one (Xvfb: setup.sh installs it, " \
                                      "pytest-xvfb starts it)"
    manager = PluginManager.instance()
    if "icl-sam2" not in manager:
        manager.register(PluginManifest.from_file(MANIFEST))
    yield manager.get_manifest("icl-sam2")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """An LPS-like phantom (image, label), its RAS copy, and the label drawn per structure on every 4th slice."""
    root = tmp_path_factory.mktemp("napari")
    (image,), label, affine = make_case(0, seed=4, shape=SHAPE, classes=("ellipsoid", "box"))
    paths = {"image": root / "image.nii.gz", "label": root / "label.nii.gz", "ras": root / "image_ras.nii.gz",
             "sparse": root / "sparse.nii.gz"}
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(paths["image"]))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(paths["label"]))
    ras = nib.as_closest_canonical(nib.load(str(paths["image"])))
    nib.save(nib.Nifti1Image(np.asarray(ras.dataobj), ras.affine), str(paths["ras"]))
    canonical = np.asarray(Scan.open(paths["label"]).canonical)
    sparse, drawn = annotate_sparse(canonical, CLASSES, EVERY, axis=2)
    scan = Scan.open(paths["label"])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(scan.from_canonical(sparse)), affine), str(paths["sparse"]))
    paths["sparse_ras"] = root / "sparse_ras.nii.gz"  # the same drawing on the RAS copy (canonical: as it is)
    nib.save(nib.Nifti1Image(sparse, ras.affine), str(paths["sparse_ras"]))
    paths["other"] = root / "other_ras.nii.gz"  # another scan: the RAS copy in another contrast (not the same scan)
    nib.save(nib.Nifti1Image(np.asarray(ras.dataobj) * 1.2 + 40.0, ras.affine), str(paths["other"]))
    return {**paths, "affine": affine, "sparse_canonical": sparse, "drawn": drawn}


@pytest.fixture(scope="module")
def api_fills(phantom):
    """What the API (the CLI's engine) gives for the files, per fill method: what the widget must give; and the
    steps the engine reported meanwhile (``icl.progress.observe``, what the widget's progress bar shows)."""
    out, steps = {}, []
    for fill in ("auto", "model", "registration"):
        with observe(lambda what, done, total: steps.append((fill, what.split()[0], done, total))):
            out[fill] = ICLSegmenter(support_slices="labelled", fill=fill).segment(
                phantom["image"], phantom["image"], phantom["sparse"])
    return out, steps


def _open_widget(viewer) -> FillWidget:
    _, widget = viewer.window.add_plugin_dock_widget("icl-sam2", "In-context fill")
    assert isinstance(widget, FillWidget)
    return widget


def _draw(viewer, phantom, image) -> Labels:
    """The user's Labels layer: the sparse annotation, drawn on the image (its grid, as napari's new-labels)."""
    return viewer.add_labels(phantom["sparse_canonical"].copy(), name="drawn", scale=image.scale,
                             translate=image.translate)


def _notifications(qtbot, action) -> list[str]:
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        action()
        qtbot.wait(50)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    return [n.message for n in seen]


# ---------------------------------------------------------------------------------------------------- reader
def test_reader_shows_lps_and_ras_files_alike(make_napari_viewer, phantom):
    (lps, lps_kw, kind), = read_scans(str(phantom["image"]))
    (ras, ras_kw, _), = read_scans(str(phantom["ras"]))
    assert kind == "image" and lps.shape == ras.shape == tuple(np.asarray(nib.load(str(phantom["ras"])).shape))
    np.testing.assert_array_equal(lps, ras)  # the same anatomy, voxel for voxel
    spacing = np.sqrt((phantom["affine"][:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(lps_kw["scale"], spacing)
    np.testing.assert_allclose(lps_kw["scale"], ras_kw["scale"])
    np.testing.assert_allclose(lps_kw["translate"], ras_kw["translate"])  # the same place in the world
    np.testing.assert_array_equal(lps_kw["metadata"]["nifti"]["affine"], nib.load(str(phantom["image"])).affine)
    assert get_reader(str(phantom["image"])) is read_scans and get_reader("scan.png") is None
    viewer = make_napari_viewer()  # through npe2: the manifest's reader
    image, label = viewer.open(str(phantom["image"]), plugin="icl-sam2")[0], \
        viewer.open(str(phantom["label"]), plugin="icl-sam2")[0]
    assert isinstance(image, Image) and isinstance(label, Labels)
    np.testing.assert_array_equal(image.data, lps)
    np.testing.assert_allclose(image.scale, spacing)
    assert set(np.unique(label.data)) == {0, *CLASSES}


# ---------------------------------------------------------------------------------------------------- writer
def test_writer_round_trips_on_the_source_grid(make_napari_viewer, phantom, tmp_path):
    viewer = make_napari_viewer()
    label = viewer.open(str(phantom["label"]), plugin="icl-sam2")[0]
    out = tmp_path / "saved.nii.gz"
    label.save(str(out), plugin="icl-sam2")
    saved, source = nib.load(str(out)), nib.load(str(phantom["label"]))
    np.testing.assert_array_equal(saved.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), np.asarray(source.dataobj))  # the file's voxel order
    drawn = viewer.add_labels(np.zeros((4, 5, 6), np.uint8), scale=(1, 2, 3), translate=(5, 6, 7))
    drawn.data[1, 2, 3] = 9
    drawn.save(str(tmp_path / "plain.nii.gz"), plugin="icl-sam2")  # no NIfTI origin: its scale and translate
    plain = nib.load(str(tmp_path / "plain.nii.gz"))
    np.testing.assert_array_equal(plain.affine[:3], [[1, 0, 0, 5], [0, 2, 0, 6], [0, 0, 3, 7]])
    assert np.asarray(plain.dataobj)[1, 2, 3] == 9


# ---------------------------------------------------------------------------------------------------- widget
@pytest.mark.parametrize("fill", ["auto", "model", "registration"])
def test_widget_fills_like_the_api(make_napari_viewer, qtbot, phantom, api_fills, fill):
    expected = api_fills[0][fill]
    viewer = make_napari_viewer()
    image = viewer.open(str(phantom["image"]), plugin="icl-sam2")[0]
    drawn = _draw(viewer, phantom, image)
    before = drawn.data.copy()
    widget = _open_widget(viewer)
    viewer.dims.order = (2, 0, 1)  # slide through axial slices: the widget follows
    assert widget.axis_box.currentData() == 2
    widget.image_box.choose(image.name)
    widget.labels_box.choose(drawn.name)
    widget.fill_box.setCurrentText(fill)
    widget.run_button.click()
    qtbot.waitUntil(lambda: "drawn filled" in viewer.layers, timeout=FILL_TIMEOUT_MS)
    filled = viewer.layers["drawn filled"]
    np.testing.assert_array_equal(filled.data, expected.canonical_labels())
    assert set(np.unique(filled.data)) == {0, *CLASSES}
    np.testing.assert_array_equal(drawn.data, before)  # the user's layer is never changed
    np.testing.assert_allclose(filled.scale, image.scale)
    rows = [[widget.table.item(r, col).text() for col in range(widget.table.columnCount())]
            for r in range(widget.table.rowCount())]
    assert [row[0] for row in rows] == [str(c) for c in CLASSES]  # one row per structure
    for row, check in zip(rows, expected.checks):
        dice = [check.dice.get(m) for m in ("interpolation", "nearest", "model", "registration")]
        assert row[1:6] == [*("-" if v is None else f"{v:.3f}" for v in dice), check.chosen]
        assert row[4] != "-" and (row[3] != "-") == (fill != "registration")  # the model runs for auto and model
        assert row[6] == f"{check.held_out_slices} of {check.annotated_slices}"  # the slices it rests on
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=5_000)


def test_support_from_another_scan_fills_like_the_api(make_napari_viewer, qtbot, phantom):
    """Labels drawn on another open scan (here another contrast on another grid): registered to the image and
    carried over, as ``icl.segment`` does with a support scan that is not the query (#25)."""
    expected = ICLSegmenter().segment(phantom["image"], phantom["other"], phantom["sparse_ras"])
    viewer = make_napari_viewer()
    image = viewer.open(str(phantom["image"]), plugin="icl-sam2")[0]
    other = viewer.open(str(phantom["other"]), plugin="icl-sam2")[0]
    viewer.add_labels(phantom["sparse_canonical"].copy(), name="drawn", scale=other.scale,
                      translate=other.translate)
    widget = _open_widget(viewer)
    widget.image_box.choose(image.name)
    widget.support_box.choose(other.name)
    widget.labels_box.choose("drawn")
    widget.axis_box.setCurrentIndex(widget.axis_box.findData(2))
    widget.run_button.click()
    qtbot.waitUntil(lambda: "drawn filled" in viewer.layers, timeout=FILL_TIMEOUT_MS)
    assert expected.mode == "registered" and widget.result.mode == "registered"
    np.testing.assert_array_equal(viewer.layers["drawn filled"].data, expected.canonical_labels())
    assert widget.table.rowCount() == len(expected.checks) == 2  # one support: each row says nothing to check
    assert widget.table.item(0, len(TABLE) - 1).text() == "1 support scan(s): nothing to check"
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=5_000)


def test_bad_input_is_one_line_and_no_layer(make_napari_viewer, qtbot, phantom):
    viewer = make_napari_viewer()
    image = viewer.open(str(phantom["image"]), plugin="icl-sam2")[0]
    widget = _open_widget(viewer)
    widget.image_box.choose(image.name)
    for data, says in ((np.zeros((8, 8, 8), np.uint8), "has shape (8, 8, 8)"),  # another image's labels
                       (np.zeros(image.data.shape, np.uint8), "no annotated slice")):  # nothing drawn yet
        viewer.add_labels(data, name="drawn")
        widget.labels_box.choose("drawn")
        messages = _notifications(qtbot, widget.run_button.click)
        line = widget.status.text()
        assert line.startswith("error: ") and "\n" not in line and says in line
        assert messages == [line.removeprefix("error: ")]
        assert widget.worker is None and [lay.name for lay in viewer.layers] == [image.name, "drawn"]
        viewer.layers.remove("drawn")


def test_cancel_adds_no_layer(make_napari_viewer, qtbot, phantom):
    viewer = make_napari_viewer()
    image = viewer.open(str(phantom["image"]), plugin="icl-sam2")[0]
    drawn = _draw(viewer, phantom, image)
    widget = _open_widget(viewer)
    widget.axis_box.setCurrentIndex(widget.axis_box.findData(2))
    widget.image_box.choose(image.name)
    widget.labels_box.choose(drawn.name)
    widget.run_button.click()
    job = widget.job
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not job.running and widget.run_button.isEnabled(), timeout=FILL_TIMEOUT_MS)
    assert widget.status.text().startswith("cancelled")
    assert "drawn filled" not in viewer.layers and job.result is None


def test_the_engine_reports_each_slice_of_the_self_check_and_the_fill(api_fills):
    depth = SHAPE[2]  # the phantom's slice axis is canonical axis 2 too
    steps = api_fills[1]
    for fill in ("auto", "model"):
        for what in ("self-check", "fill"):
            assert [done for f, w, done, total in steps if (f, w) == (fill, what)] == list(range(depth + 1))
            assert {total for f, w, _, total in steps if (f, w) == (fill, what)} == {depth}
    registered = [(done, total) for f, w, done, total in steps if (f, w) == ("registration", "register")]
    assert registered and registered[-1][0] == registered[-1][1] > 0  # the image-guided fill's pairs, counted


def test_job_generator_returns_the_fill_and_names_layers_in_errors(phantom, api_fills):
    """Without Qt: the generator napari's worker runs returns the API's fill; an API refusal comes back as one
    line naming the layer instead of the API's placeholder."""
    scan = Scan.open(phantom["image"])
    grid = Grid(scan.affine, scan.header, scan.shape)
    request = FillRequest(Layer("scan", np.asarray(scan.canonical), grid),
                          Layer("drawn", phantom["sparse_canonical"], grid))
    steps = FillJob(request, lambda options: ICLSegmenter(**options)).steps()
    with pytest.raises(StopIteration) as stop:
        while True:
            assert len(next(steps)) == 3
    result = stop.value.value
    assert isinstance(result, FillResult) and result.classes == CLASSES
    np.testing.assert_array_equal(result.labels, api_fills[0]["auto"].canonical_labels())
    assert one_line(InputError("<support_label>", "label shape differs"), request) == "'drawn': label shape differs"
