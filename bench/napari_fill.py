"""The napari plugin on a real scan: INIA19 annotated per structure on every 6th axial slice, filled through the
"In-context fill" widget, a screenshot of it (``docs/napari_fill.png``) and its time against the CLI's.

It does what a user does: opens the T1 with the plugin's reader, draws (here: ``icl.sparse.protocol.annotate_sparse``,
the development protocol's annotator) on a Labels layer, opens the dock widget and presses Fill. With ``--time`` it
also runs ``python -m icl.segment --support-slices labelled`` on the same annotation (written as NIfTI), checks that
both give the same labels, and prints the seconds of each (the widget: from the click to the new layer, the model
loaded in it as the CLI loads it). It needs a display: under Xvfb,

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python bench/napari_fill.py --data ../shared/data/inia19 \\
        [--out docs/napari_fill.png] [--time --repeat 2]

The data folder is only read; nothing of it is written anywhere but a temporary folder (``--time``).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import napari
import numpy as np
from npe2 import PluginManager, PluginManifest
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.data.frames import Scan  # noqa: E402
from icl.napari.widget import FillWidget  # noqa: E402
from icl.sparse.protocol import annotate_sparse, sparse_dice  # noqa: E402

CLASSES = [1, 1001, 147, 1147, 45, 1045, 37, 1037, 7, 1007]  # the protocol's ten structures
T1, ATLAS = "inia19-t1-brain.nii.gz", "inia19-NeuroMaps.nii.gz"
FILLED = "annotation filled"


def plugin() -> None:
    """The plugin as napari finds it once installed (``pip install -e .``), or from this tree's manifest."""
    manager = PluginManager.instance()
    if "icl-sam2" not in manager:
        manager.register(PluginManifest.from_file(ROOT / "icl/napari/napari.yaml"))


def settle() -> None:
    """What napari's event loop does between a user's actions and this script's ``processEvents`` does not: delete
    the widgets napari scheduled for deletion. Opening a file shows a progress bar in the status bar's activity
    item, with an animated "in progress" GIF that stops when the finished bar is *deleted* (``deleteLater``);
    without this the GIF animates for the whole run, repainting the window (and re-compositing its OpenGL canvas)
    about 17 times a second: measured +34-52 % on the widget's fill under Xvfb's software renderer."""
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()


def wait_for(condition, timeout: float) -> None:
    app, end = QApplication.instance(), time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the fill did not finish in time")
        app.processEvents()
        time.sleep(0.01)


def fill_in_viewer(viewer, widget: FillWidget, annotation: np.ndarray, image) -> tuple[float, np.ndarray]:
    """Draw the annotation as a new Labels layer, press Fill, wait for the new layer: (seconds, its labels)."""
    for name in ("annotation", FILLED):
        if name in viewer.layers:
            viewer.layers.remove(name)
    viewer.add_labels(annotation.copy(), name="annotation", scale=image.scale, translate=image.translate)
    widget.image_box.choose(image.name)
    widget.labels_box.choose("annotation")
    widget.axis_box.setCurrentIndex(widget.axis_box.findData(2))  # drawn on axial slices
    widget.fill_box.setCurrentText("auto")
    start = time.perf_counter()
    widget.run_button.click()
    wait_for(lambda: FILLED in viewer.layers, timeout=3600)
    seconds = time.perf_counter() - start
    wait_for(lambda: widget.run_button.isEnabled(), timeout=60)
    return seconds, np.asarray(viewer.layers[FILLED].data)


def cli_fill(t1: Path, annotation: np.ndarray, scan: Scan, tmp: Path) -> tuple[float, np.ndarray]:
    """The same annotation through ``python -m icl.segment`` (a NIfTI file, as a user gives it): (seconds, labels)."""
    sparse, out = tmp / "annotation.nii.gz", tmp / "filled.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(scan.from_canonical(annotation)), scan.affine), str(sparse))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icl.segment", "--support", str(t1), "--support-label", str(sparse),
                    "--query", str(t1), "--out", str(out), "--support-slices", "labelled", "--quiet"],
                   cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    return seconds, np.asarray(Scan.open(out).canonical)


def compose_view(viewer, widget: FillWidget, image, truth: np.ndarray) -> None:
    """Two panes in a coronal view (the annotation is axial, so it shows as stripes): the annotation beside the
    fill, on the same slice through the structures, superior up."""
    filled, drawn = viewer.layers[FILLED], viewer.layers["annotation"]
    second = viewer.add_image(image.data, name="T1 ", scale=image.scale, translate=image.translate,
                              contrast_limits=image.contrast_limits, colormap="gray")
    viewer.layers.move(viewer.layers.index(second), viewer.layers.index(filled))  # [T1, annotation, T1 , filled]
    drawn.opacity, filled.opacity = 0.9, 0.6
    viewer.grid.enabled, viewer.grid.stride, viewer.grid.shape = True, 2, (1, 2)
    y = int(np.argmax(np.isin(truth, CLASSES).sum((0, 2))))  # the coronal slice crossing most structure voxels
    viewer.dims.order = (1, 2, 0)  # slide through y: rows z (superior), columns x (right)
    viewer.dims.set_point(1, y * image.scale[1] + image.translate[1])
    viewer.camera.orientation2d = ("up", "right")
    viewer.reset_view()
    viewer.camera.zoom *= 1.3
    widget.axis_box.setCurrentIndex(widget.axis_box.findData(2))  # the axis the fill ran along (the view moved)
    viewer.text_overlay.visible = True
    viewer.text_overlay.text = ("INIA19 T1, coronal slice: left the annotation (each structure on every 6th axial "
                                "slice), right the in-context fill")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the INIA19 folder (read only)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/napari_fill.png")
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--time", action="store_true", help="also time the CLI on the same annotation")
    p.add_argument("--repeat", type=int, default=1, help="with --time: runs of each, alternating")
    args = p.parse_args(argv)

    plugin()
    t1 = args.data / T1
    truth = np.asarray(Scan.open(args.data / ATLAS).canonical)
    annotation, drawn = annotate_sparse(truth, CLASSES, args.every, axis=2)
    viewer = napari.Viewer(show=True, title="icl-sam2: in-context fill")
    viewer.window.resize(1800, 1000)
    image = viewer.open(str(t1), plugin="icl-sam2")[0]
    _, widget = viewer.window.add_plugin_dock_widget("icl-sam2", "In-context fill")
    settle()  # as a user's viewer is, once napari's event loop has run
    times: dict[str, list[float]] = {"widget": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        scan = Scan.open(t1)
        for run in range(args.repeat if args.time else 1):
            if args.time:
                widget._segmenters.clear()  # each run loads the model, as each CLI run does
                seconds, cli_labels = cli_fill(t1, annotation, scan, Path(tmp))
                times["cli"].append(seconds)
            seconds, labels = fill_in_viewer(viewer, widget, annotation, image)
            times["widget"].append(seconds)
            if args.time:
                same = np.array_equal(labels, cli_labels)
                print(f"run {run + 1}: CLI {times['cli'][-1]:.1f} s, widget {seconds:.1f} s (its fill "
                      f"{widget.result.seconds:.1f} s), same labels: {same}", flush=True)
                if not same:
                    raise SystemExit("the widget and the CLI disagree")
    dice = sparse_dice(labels, truth, CLASSES, drawn)
    print(f"mean Dice on the unannotated slices: {np.nanmean(list(dice.values())):.3f}; the widget's status: "
          f"{widget.status.text()}")
    if args.time:
        cli, gui = statistics.median(times["cli"]), statistics.median(times["widget"])
        print(f"median of {len(times['cli'])}: CLI {cli:.1f} s, widget {gui:.1f} s ({100 * (gui / cli - 1):+.0f} %)")
    compose_view(viewer, widget, image, truth)
    for _ in range(20):
        QApplication.instance().processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
