"""The "In-context fill" dock widget: fill the structures a user drew on a few slices, in the viewer.

The user's Labels layer is read, never changed: the fill is a new Labels layer on the image's grid, and the
self-check table (held-out Dice per method, the method chosen, the slices it rests on) shows what it is worth.
The work is :class:`icl.napari.job.FillJob` in napari's thread worker (a generator, so Cancel stops it); bad input
is one line in the widget and in napari's notifications, never a traceback dialog.
"""
from __future__ import annotations

from typing import Any

from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                            QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from icl.api import ICLSegmenter
from icl.napari.job import FillError, FillJob, FillRequest, FillResult, Layer
from icl.napari.reader import SEGMENTS, segment_kwargs
from icl.sparse.cross_check import CrossCheck
from icl.sparse.fill import StructureCheck
from icl.sparse.methods import FILLS, INTERPOLATION, MODEL, NEAREST, REGISTRATION

AXES = ((0, "0: sagittal (x)"), (1, "1: coronal (y)"), (2, "2: axial (z)"))  # canonical (RAS) axes of the layers
ITSELF = "(the image itself)"
TABLE = ("structure", INTERPOLATION, NEAREST, MODEL, REGISTRATION, "chosen", "rests on")  # Dice per method


class LayerBox(QComboBox):
    """The names of the viewer's layers of one kind, kept up to date; ``none`` (a text) is an extra first entry."""

    def __init__(self, viewer: Any, kind: type, none: str | None = None):
        super().__init__()
        self.viewer, self.kind, self.none = viewer, kind, none
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.renamed):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = ([self.none] if self.none else []) + [lay.name for lay in self.viewer.layers
                                                      if isinstance(lay, self.kind)]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)

    def choose(self, name: str) -> None:
        self.refresh()
        self.setCurrentText(name)

    def layer(self) -> Any | None:
        name = self.currentText()
        if not name or name == self.none or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]


class FillWidget(QWidget):
    """The dock widget (npe2 command ``icl-sam2.fill_widget``)."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.job: FillJob | None = None
        self.result: FillResult | None = None
        self._segmenters: dict[tuple, ICLSegmenter] = {}

        self.image_box = LayerBox(napari_viewer, Image)
        self.labels_box = LayerBox(napari_viewer, Labels)
        self.support_box = LayerBox(napari_viewer, Image, none=ITSELF)
        self.axis_box = QComboBox()
        for axis, text in AXES:
            self.axis_box.addItem(text, axis)
        self.fill_box = QComboBox()
        self.fill_box.addItems(list(FILLS))  # the API's fills (registration: 2D on a drawing, 3D from another scan)
        self.complete_box = QCheckBox("complete slices (every drawn slice holds every structure)")
        self.run_button, self.cancel_button = QPushButton("Fill"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.bar = QProgressBar()
        self.status = QLabel("Draw each structure on a few slices, then Fill.")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(TABLE))
        self.table.setHorizontalHeaderLabels(list(TABLE))
        self.table.verticalHeader().setVisible(False)

        form = QFormLayout()
        form.addRow("image", self.image_box)
        form.addRow("labels", self.labels_box)
        form.addRow("drawn on", self.support_box)
        form.addRow("slice axis", self.axis_box)
        form.addRow("fill", self.fill_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.complete_box)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        self.support_box.setToolTip("where the labels are drawn: the image itself (a sparse fill), or another open "
                                    "scan (support from another scan)")

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        napari_viewer.dims.events.order.connect(self._follow_view)
        self._follow_view()

    # ------------------------------------------------------------------------------------------------ input
    def _follow_view(self, *_: Any) -> None:
        """The slice axis defaults to the one the viewer slides through (the axis the user draws on)."""
        order = self.viewer.dims.order
        if len(order) == 3 and self.viewer.dims.ndisplay == 2:
            self.axis_box.setCurrentIndex(self.axis_box.findData(int(order[0])))

    def request(self) -> FillRequest:
        """The fill the controls describe, checked (:class:`FillError`: one line)."""
        image, labels, support = self.image_box.layer(), self.labels_box.layer(), self.support_box.layer()
        if image is None or labels is None:
            raise FillError("open an image and a Labels layer drawn on it first")
        if getattr(image, "rgb", False):
            raise FillError(f"image '{image.name}' is RGB: the fill needs a 3D scan")
        request = FillRequest(Layer.of(image), Layer.of(labels), None if support is None or support is image
                              else Layer.of(support), int(self.axis_box.currentData()), self.fill_box.currentText(),
                              self.complete_box.isChecked())
        request.check()
        return request

    def segmenter(self, options: dict) -> ICLSegmenter:
        """The API's segmenter for these options (the shipped default model), built once per set of options."""
        key = tuple(sorted(options.items()))
        if key not in self._segmenters:
            self._segmenters[key] = ICLSegmenter(**options)
        return self._segmenters[key]

    # ------------------------------------------------------------------------------------------------ the run
    def run(self) -> None:
        """Start the fill off the GUI thread; bad input stops here with one line."""
        if self.worker is not None:
            return
        try:
            request = self.request()
        except FillError as err:
            self._fail(str(err))
            return
        self.job = FillJob(request, self.segmenter)
        self.worker = thread_worker(self.job.steps, ignore_errors=True)()
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._on_result)
        self.worker.errored.connect(self._on_error)
        self.worker.aborted.connect(self._on_cancelled)
        self.worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setRange(0, 1)  # never the busy animation: every repaint re-composites napari's GL canvas
        self.bar.setValue(0)
        self.status.setText("filling …")
        self.worker.start()

    def cancel(self) -> None:
        """Stop the fill: the engine stops at its next slice; no layer is added."""
        if self.job is not None:
            self.job.cancel()
        if self.worker is not None:
            self.worker.quit()

    def _on_step(self, step: tuple[str, int, int | None]) -> None:
        """The engine's step (``self-check``, ``fill``, slice by slice); Qt repaints only what changed."""
        what, done, total = step
        if total:
            self.bar.setRange(0, int(total))
            self.bar.setValue(int(done))
            self.status.setText(f"{what.split()[0]}: slice {done} of {total}")
        else:
            self.status.setText(what)

    def _on_result(self, result: FillResult | None) -> None:
        if result is None or self.job is None:
            self._on_cancelled()
            return
        request = self.job.request
        image = self.viewer.layers[request.image.name] if request.image.name in self.viewer.layers else None
        kwargs = {} if image is None else {"scale": image.scale, "translate": image.translate}
        drawn = self.viewer.layers[request.labels.name] if request.labels.name in self.viewer.layers else None
        segments = None if drawn is None else drawn.metadata.get(SEGMENTS)  # a Slicer segmentation's names
        kwargs.update(segment_kwargs(segments, result.classes))
        self.viewer.add_labels(result.labels, name=f"{request.labels.name} filled",
                               metadata={**request.image.grid.metadata(), SEGMENTS: segments}, **kwargs)
        self.result = result
        self._show_checks(result.checks)
        self.bar.setRange(0, 1)
        self.bar.setValue(1)
        what = "self-check below" if result.checks else "support from another scan: no self-check"
        self.status.setText(f"filled {len(result.classes)} structure(s) in {result.seconds:.1f} s ({what})")

    def _on_error(self, err: BaseException) -> None:
        self._fail(str(err) if isinstance(err, FillError) else f"the fill failed: {type(err).__name__}: {err}")

    def _on_cancelled(self) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status.setText("cancelled: no layer added")

    def _on_finished(self) -> None:
        if self.job is not None and self.job.cancelled and self.job.result is None:
            self._on_cancelled()  # quit before the first step: neither aborted nor returned was emitted
        self.worker = None
        self.cancel_button.setEnabled(False)
        self._enable_when_idle()

    def _enable_when_idle(self) -> None:
        """Fill again once a cancelled engine has stopped (it shares the segmenter)."""
        if self.job is not None and self.job.running:
            QTimer.singleShot(100, self._enable_when_idle)
            return
        self.run_button.setEnabled(True)

    def _fail(self, line: str) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status.setText(f"error: {line}")
        show_error(line)

    # ------------------------------------------------------------------------------------------------ output
    def _show_checks(self, checks: list[StructureCheck | CrossCheck]) -> None:
        """The self-check table, one row per structure (the CLI prints the same lines on stderr): held-out Dice of
        a drawing's fills, or registration's leave-one-out Dice with support from other scans."""
        self.table.setRowCount(len(checks))
        for row, check in enumerate(checks):
            dice = [check.dice.get(m) for m in TABLE[1:5]]
            if isinstance(check, CrossCheck):  # what the estimate rests on: the support scans left out in turn
                rests = f"{check.supports} support scan(s)" + ("" if check.supports > 1 else ": nothing to check")
            else:  # slices the Dice rests on, of those drawn
                rests = (f"{check.held_out_slices} of {check.annotated_slices}" if check.held_out_slices
                         else f"0 of {check.annotated_slices}: too few")
            cells = [str(check.structure), *("-" if v is None else f"{v:.3f}" for v in dice), check.chosen, rests]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(check.line())
                self.table.setItem(row, col, item)
        self.table.resizeColumnsToContents()
