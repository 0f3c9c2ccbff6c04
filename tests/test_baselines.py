"""Classic sparse-annotation baselines: the simulated annotation, nearest-slice copy, ITK contour interpolation."""
from __future__ import annotations

import numpy as np
import pytest

from icl.sparse.itk_contour import itk_interpolation
from bench.baselines import nearest_copy
from icl.sparse.protocol import sparse_label
from icl.data.sampling import labelled_slices


def _label() -> np.ndarray:
    label = np.zeros((20, 20, 12), np.uint8)
    label[5:10, 5:10, 2:9] = 1
    label[12:18, 3:8, 4:11] = 2
    return label


def test_sparse_label_keeps_every_kth_slice_from_the_first_labelled():
    sparse, kept = sparse_label(_label(), 3)
    assert kept == [2, 5, 8, 11] and labelled_slices(sparse) == [2, 5, 8]  # slice 11 holds no label
    np.testing.assert_array_equal(sparse[..., kept], _label()[..., kept])
    assert not sparse[..., [z for z in range(12) if z not in kept]].any()


def test_nearest_copy_takes_the_closest_annotated_slice():
    sparse, _ = sparse_label(_label(), 3)
    filled = nearest_copy(sparse)
    for z, source in ((0, 2), (3, 2), (4, 5), (6, 5), (7, 8), (11, 8)):
        np.testing.assert_array_equal(filled[..., z], sparse[..., source])


def test_itk_interpolates_between_annotations_only():
    pytest.importorskip("itk", reason="optional: pip install -r bench/requirements-bench.txt")
    sparse, _ = sparse_label(_label(), 3)
    filled = itk_interpolation(sparse)
    assert filled.shape == sparse.shape and filled.dtype == sparse.dtype
    np.testing.assert_array_equal(filled[..., [2, 5, 8]], sparse[..., [2, 5, 8]])
    assert (filled[..., 3:5] == 1).any() and (filled[..., 6:8] == 2).any()  # in between: interpolated
    assert not filled[..., :2].any() and not filled[..., 9:].any()  # outside: it does not extrapolate


def test_real_anatomy_skips_a_row_whose_drawn_slices_miss_a_structure(tmp_path, capsys):
    """Complete slices @ 1000 draw the union's middle slice only; a structure not on it has nothing to propagate
    from. The row is skipped with a note (it was an InputError traceback that lost the run's JSON)."""
    from bench.real_anatomy import sparse_rows

    label = np.zeros((12, 12, 20), np.int16)
    label[2:6, 2:6, 1:5] = 1
    label[6:10, 6:10, 14:19] = 2
    rows = sparse_rows(None, np.zeros(label.shape, np.float32), label, np.eye(4), [1, 2], ["complete"], [1000],
                       tmp_path, classic=False)
    assert rows == [] and "row skipped" in capsys.readouterr().err
