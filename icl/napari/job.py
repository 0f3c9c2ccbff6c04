"""One fill as the widget runs it, without Qt: the layers' arrays checked (one line per problem), handed to the API
as (array, affine) pairs on their files' grids, and the result put back in the layers' canonical orientation.

Why a job object: napari's thread worker cancels a *generator* between two of its yields, but the API's fill is one
call. So the call runs in a helper thread while :meth:`FillJob.steps` yields its progress (every bar the engine
opens, ``icl.progress.observe``); Cancel raises :class:`Cancelled` from the next step the engine reports, which
unwinds the call through its own ``finally`` blocks. The API is the CLI's (``icl.api.ICLSegmenter``, the same
options), so the widget, ``python -m icl.segment`` and the benchmarks give the same labels.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from icl.api import ICLSegmenter, Segmentation
from icl.errors import InputError
from icl.infer.support import LABELLED
from icl.napari.grid import Grid
from icl.progress import observe
from icl.sparse.cross_check import CrossCheck
from icl.sparse.fill import StructureCheck
from icl.sparse.methods import AUTO, CROSS_SCAN_FILLS, FILLS, SAME_SCAN_FILLS

POLL_S = 0.5  # how often the worker reports the engine's progress to the GUI: each repaint of the dock
# re-composites napari's OpenGL canvas, which on a software renderer (Mesa llvmpipe) costs the fill CPU
CROSS_SCAN_SUPPORT = "auto"  # support slices from another scan: 3 per structure, spread over its extent (the CLI's)


class Cancelled(Exception):
    """The user pressed Cancel (raised inside the engine's thread, at its next progress step)."""


class FillError(Exception):
    """One line for the widget and napari's notification (a bad input, or the engine's error said briefly)."""


@dataclass
class Layer:
    """What the job needs of a napari layer: its name, canonical data and grid."""

    name: str
    data: np.ndarray
    grid: Grid

    @classmethod
    def of(cls, layer) -> "Layer":
        data = np.asarray(layer.data)
        return cls(layer.name, data, Grid.of_layer(data.shape, layer.metadata, layer.scale, layer.translate))


@dataclass
class FillRequest:
    """A fill: ``image`` filled from ``labels`` drawn on ``support`` (None: on ``image`` itself, the sparse fill)."""

    image: Layer
    labels: Layer
    support: Layer | None = None
    slice_axis: int = 2
    fill: str = AUTO
    complete_slices: bool = False

    @property
    def drawn_on(self) -> Layer:
        return self.support or self.image

    def check(self) -> None:
        """Bad input as one :class:`FillError` line, before any work."""
        for layer in (self.image, self.drawn_on):
            if layer.data.ndim != 3:
                raise FillError(f"image '{layer.name}' is {layer.data.ndim}D {layer.data.shape}: the fill needs a "
                                "3D scan")
        if self.labels.data.shape != self.drawn_on.data.shape:
            raise FillError(f"labels '{self.labels.name}' has shape {self.labels.data.shape}, image "
                            f"'{self.drawn_on.name}' {self.drawn_on.data.shape}: draw on a Labels layer of that image")
        if self.labels.data.dtype.kind not in "biu":
            raise FillError(f"labels '{self.labels.name}' holds {self.labels.data.dtype} values, not label values")
        if not np.any(self.labels.data > 0):
            raise FillError(f"labels '{self.labels.name}' has no annotated slice: draw each structure on a few "
                            f"slices along axis {self.slice_axis}")
        if self.labels.data.min() < 0:
            raise FillError(f"labels '{self.labels.name}' holds negative values: label values are 0 (background) "
                            "or positive")
        if self.fill not in FILLS:
            raise FillError(f"fill method {self.fill!r}: expected one of {', '.join(FILLS)}")
        if self.support is not None and self.fill not in CROSS_SCAN_FILLS:
            raise FillError(f"fill {self.fill} fills a scan from its own annotated slices: support from another "
                            f"scan needs {', '.join(CROSS_SCAN_FILLS)}")
        if self.support is None and self.fill not in SAME_SCAN_FILLS:
            raise FillError(f"fill {self.fill} carries another scan's labels: choose that scan as the support, or "
                            f"fill this drawing with {', '.join(SAME_SCAN_FILLS)}")
        if self.support is not None and self.complete_slices:
            raise FillError("complete slices describes a scan's own annotation: not with support from another scan")

    def options(self) -> dict:
        """The API's options for this fill (``ICLSegmenter``'s keyword arguments)."""
        sparse = self.support is None
        return dict(slice_axis=self.slice_axis, fill=self.fill, complete_slices=self.complete_slices,
                    support_slices=LABELLED if sparse else CROSS_SCAN_SUPPORT)

    def inputs(self) -> dict:
        """``segment``'s scans as (array, affine) pairs, each in its file's voxel order and with its affine."""
        drawn = self.drawn_on
        labels = _label_array(self.labels.data)
        return dict(query=_pair(self.image), support=_pair(drawn),
                    support_label=(np.ascontiguousarray(drawn.grid.file_order(labels)), drawn.grid.affine))


@dataclass
class FillResult:
    """The fill in the image layer's canonical orientation, and the self-check table (sparse fills only)."""

    labels: np.ndarray
    classes: list[int] = field(default_factory=list)
    checks: list[StructureCheck | CrossCheck] = field(default_factory=list)
    mode: str = ""
    seconds: float = 0.0


class FillJob:
    """One run of the API in a helper thread; :meth:`steps` is the generator napari's worker runs."""

    def __init__(self, request: FillRequest, segmenter: Callable[[dict], ICLSegmenter]):
        self.request, self.segmenter = request, segmenter
        self.step: tuple[str, int, int | None] = ("starting", 0, None)
        self.result: FillResult | None = None
        self.error: BaseException | None = None
        self._cancel, self._done, self._started = threading.Event(), threading.Event(), False

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        """The engine is at work (a worker quit before its first step never starts it)."""
        return self._started and not self._done.is_set()

    def _report(self, desc: str, done: int, total: int | None) -> None:
        if self._cancel.is_set():
            raise Cancelled()
        self.step = (desc, done, total)

    def run(self) -> None:
        """The fill itself (the helper thread's target; callable directly too)."""
        start = time.perf_counter()
        try:
            with observe(self._report):
                self._report("loading the model", 0, None)
                segmenter = self.segmenter(self.request.options())
                result = segmenter.segment(**self.request.inputs())
            self.result = _result(result, time.perf_counter() - start)
        except BaseException as err:  # handed to the GUI thread as one line by steps()
            self.error = err
        finally:
            self._done.set()

    def steps(self) -> Generator[tuple[str, int, int | None], None, FillResult | None]:
        """Yield ``(what, done, total)`` until the fill ends; return its result (None when cancelled), or raise
        :class:`FillError` with one line."""
        thread = threading.Thread(target=self.run, name="icl-fill", daemon=True)
        self._started = True
        thread.start()
        try:
            while not self._done.wait(POLL_S):
                yield self.step  # also where napari's worker checks for quit()
        finally:
            if not self._done.is_set():  # the worker was quit: stop the engine at its next step
                self._cancel.set()
        if isinstance(self.error, Cancelled):
            return None
        if self.error is not None:
            raise FillError(one_line(self.error, self.request))
        return self.result


def one_line(err: BaseException, request: FillRequest) -> str:
    """An error as the widget's one line: the API's own message, its placeholders named after the layers."""
    if isinstance(err, FillError):
        return str(err)
    if isinstance(err, InputError):
        text = str(err)
        for placeholder, layer in (("<support_label>", request.labels), ("<support>", request.drawn_on),
                                   ("<query>", request.image)):
            text = text.replace(placeholder, f"'{layer.name}'")
        return text
    traceback.print_exception(err)  # a bug, not bad input: the trace goes to the terminal, one line to the user
    return f"the fill failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _pair(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(layer.grid.file_order(layer.data)), layer.grid.affine


def _label_array(data: np.ndarray) -> np.ndarray:
    """Label values in the narrowest integer type NIfTI stores (napari may hold int64, which nibabel refuses)."""
    top = int(data.max()) if data.size else 0
    for dtype in (np.uint8, np.int16, np.int32):
        if top <= np.iinfo(dtype).max:
            return data.astype(dtype, copy=False)
    raise FillError(f"label values up to {top} do not fit a NIfTI label map")


def _result(result: Segmentation, seconds: float) -> FillResult:
    labels = np.ascontiguousarray(result.canonical_labels())
    return FillResult(labels, list(result.classes), list(result.checks), result.mode, seconds)
