"""Where a layer's voxels sit: the NIfTI grid a layer came from, kept in its metadata, and the two orders of its
voxels (the file's own, which the API and the writer take, and the closest-canonical one the layer shows).

Why: the reader shows every scan in the closest canonical (RAS) orientation (``icl.data.frames``, the engine's own
view), so an LPS file and its RAS copy look alike; the API and the writer need the file's order and affine back.
A layer without a NIfTI origin (an array, a Labels layer made in napari) is taken as canonical already, its affine
made from its scale and translate.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import inv_ornt_aff

from icl.data.frames import canonical_ornt, inverse_ornt, reorient, reoriented_shape

KEY = "nifti"  # layer.metadata[KEY]: {"affine": the file's 4x4, "header": its NIfTI header, "path": str}


@dataclass
class Grid:
    """A scan's grid: the file's affine and header; ``file_shape`` in the file's voxel order."""

    affine: np.ndarray
    header: nib.Nifti1Header
    file_shape: tuple[int, int, int]
    path: str = ""

    @property
    def ornt(self) -> np.ndarray:
        return canonical_ornt(self.affine, self.path or "affine")

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return reoriented_shape(self.file_shape, self.ornt)

    @property
    def canonical_affine(self) -> np.ndarray:
        """The affine of the canonical view: voxel spacing on its diagonal for an axis-aligned scan."""
        return self.affine @ inv_ornt_aff(self.ornt, self.file_shape)

    @property
    def scale(self) -> tuple[float, float, float]:
        """Voxel spacing along the canonical axes (the layer's scale)."""
        return tuple(float(s) for s in np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(0)))

    @property
    def translate(self) -> tuple[float, float, float]:
        return tuple(float(t) for t in self.canonical_affine[:3, 3])

    def file_order(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical-order array (a layer's data) in the file's voxel order: a view."""
        if tuple(canonical.shape) != self.canonical_shape:
            raise ValueError(f"array of shape {canonical.shape} is not on the grid {self.canonical_shape}")
        return reorient(canonical, inverse_ornt(self.ornt))

    def metadata(self) -> dict[str, Any]:
        """What a layer keeps of its grid (``layer.metadata``)."""
        return {KEY: {"affine": self.affine.copy(), "header": self.header, "path": self.path}}

    @classmethod
    def of_layer(cls, data_shape: tuple[int, ...], metadata: Mapping | None, scale: Any = None,
                 translate: Any = None) -> "Grid":
        """The grid of a layer: its NIfTI origin when its metadata keeps one that fits its data, else the
        canonical grid its scale and translate describe."""
        kept = (metadata or {}).get(KEY)
        if kept is not None:
            affine = np.asarray(kept["affine"], dtype=np.float64)
            shape = tuple(int(s) for s in reoriented_shape(data_shape, inverse_ornt(canonical_ornt(affine))))
            grid = cls(affine, kept.get("header") or _header(shape), shape, str(kept.get("path") or ""))
            if grid.canonical_shape == tuple(data_shape):
                return grid
        affine = np.eye(4)
        affine[:3, :3] = np.diag(np.asarray(scale if scale is not None else (1, 1, 1), dtype=np.float64)[-3:])
        affine[:3, 3] = np.asarray(translate if translate is not None else (0, 0, 0), dtype=np.float64)[-3:]
        shape = tuple(int(s) for s in data_shape)
        return cls(affine, _header(shape), shape)  # type: ignore[arg-type]

    def label_header(self) -> nib.Nifti1Header:
        """The header for a 3D label map on this grid (a 4D source's header made 3D)."""
        header = self.header.copy()
        if tuple(header.get_data_shape()) != self.file_shape:
            header.set_data_shape(self.file_shape)
        return header


def _header(shape: tuple[int, ...]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    return header
