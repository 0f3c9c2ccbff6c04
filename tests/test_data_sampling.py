"""Sampling protocols, support picking, splits, the ICL dataset/loader and chunked residency."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_fixtures import PHANTOM_IMAGE_SIZE, PHANTOM_SHAPE, phantom_caches, phantom_datasets  # noqa: F401
from icl.data.loaders import ICLDataset, collate, make_loader, open_caches, set_epoch
from icl.data.vocabulary import SHAPES
from icl.data.preprocess import open_cache
from icl.data.sampling import extract_object, full_volume_indices, load_splits, make_splits, pick_support_slices
from icl.errors import InputError

S = PHANTOM_IMAGE_SIZE


def test_extract_object_is_a_window_of_the_class_slices(phantom_caches):
    case = open_cache(phantom_caches["btcv"])[0][0]
    holding = case.slices_with(1)
    idx = extract_object(case, 1, 3, np.random.default_rng(0))
    assert idx.dtype == np.int64 and len(idx) == 3
    start = int(np.flatnonzero(holding == idx[0])[0])
    assert np.array_equal(idx, holding[start:start + 3])
    assert (case.mask(1, idx).sum(axis=(1, 2)) > 0).all()
    assert np.array_equal(extract_object(case, 1, 100, np.random.default_rng(0)), holding)  # short object: all
    starts = {int(extract_object(case, 1, 2, np.random.default_rng(s))[0]) for s in range(20)}
    assert len(starts) > 1 and np.array_equal(extract_object(case, 1, 2, np.random.default_rng(4)),
                                              extract_object(case, 1, 2, np.random.default_rng(4)))
    with pytest.raises(InputError, match="not present"):
        extract_object(case, 12, 3, np.random.default_rng(0))


def test_pick_support_slices_spreads_over_extent():
    lab = np.zeros((20, 4, 4), np.uint8)
    lab[5:15, 1, 1] = 2
    assert pick_support_slices(lab, 2, 1).tolist() == [10]
    assert pick_support_slices(lab, 2, 2).tolist() == [7, 12]
    assert pick_support_slices(lab, 2, 5).tolist() == [6, 8, 10, 12, 14]
    assert pick_support_slices(lab, [1, 2], 3).tolist() == [6, 10, 13]
    assert pick_support_slices(lab, 2, 12).tolist().count(5) == 1 and len(pick_support_slices(lab, 2, 12)) == 12
    with pytest.raises(InputError):
        pick_support_slices(lab, 3, 1)
    assert full_volume_indices(4).tolist() == [0, 1, 2, 3]


def test_splits_deterministic_and_written(tmp_path):
    ids = [f"case_{i:02d}" for i in range(10)]
    a = make_splits(ids, 5, seed=3, path=tmp_path / "splits.json")
    b = make_splits(list(reversed(ids)), 5, seed=3)
    assert a == b and load_splits(tmp_path / "splits.json") == a
    assert json.loads((tmp_path / "splits.json").read_text())["seed"] == 3
    vals = [v for s in a for v in s["val"]]
    assert sorted(vals) == ids  # every case validated exactly once
    for s in a:
        assert not set(s["train"]) & set(s["val"]) and len(s["val"]) == 2
    assert make_splits(ids, 5, seed=4) != a
    with pytest.raises(InputError, match="--folds"):
        make_splits(ids, 11, seed=0)


def _check_sample(s, case, class_id):
    idx = s["slice_index"].numpy()
    assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.float32
    assert np.array_equal(s["image"].numpy(), np.asarray(case.image)[idx])
    assert np.array_equal(s["label"].numpy(), np.isin(np.asarray(case.label)[idx], case.sources(class_id)))
    assert set(np.unique(s["label"].numpy())) <= {0.0, 1.0}
    assert (s["support_label"].sum(dim=(1, 2)) > 0).all() and s["support_image"].shape[1:] == (S, S)


def test_gt_slices_samples(phantom_caches):
    cases, _ = open_caches([phantom_caches["msd"]])
    ds = ICLDataset(cases, protocol="gt_slices", video_length=3, num_support=2, seed=1)
    assert len(ds) == 3 * len(SHAPES)
    by_id = {c.id: c for c in cases}
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, S, S) and s["support_image"].shape == (2, S, S)
        assert (s["label"].sum(dim=(1, 2)) > 0).all()  # seed protocol: every query slice holds the class
        _check_sample(s, by_id[s["name"]], s["class_id"])
    a, b = ds[5], ds[5]
    assert all(torch.equal(a[k], b[k]) for k in ["image", "support_image", "slice_index"])


def test_full_volume_samples_and_support_instance(phantom_caches):
    cases, _ = open_caches([phantom_caches["kits"]])
    ds = ICLDataset(cases[1:], protocol="full_volume", num_support=3, class_ids=[1, 2],
                    support_instance="case_00000", support_cases=cases[:1])
    assert len(ds) == 4
    s = ds[0]
    assert s["image"].shape == (PHANTOM_SHAPE[2], S, S) and s["slice_index"].tolist() == list(range(PHANTOM_SHAPE[2]))
    assert (s["label"].sum(dim=(1, 2)) == 0).any()  # full volume includes slices without the class
    _check_sample(s, cases[1], s["class_id"])
    sup = cases[0]
    expected = pick_support_slices(np.asarray(sup.label), sup.sources(s["class_id"]), 3)
    assert np.array_equal(s["support_image"].numpy(), np.asarray(sup.image)[expected])
    with pytest.raises(InputError, match="support_instance") as e:
        ICLDataset(cases, support_instance="case_99999")
    assert "case_99999" in str(e.value)
    with pytest.raises(InputError, match="--protocol"):
        ICLDataset(cases, protocol="random")


def test_loader_collate_and_distributed(phantom_caches):
    cases, _ = open_caches([phantom_caches["btcv"]])
    ds = ICLDataset(cases, video_length=2)
    batch = next(iter(make_loader(ds, seed=0)))
    assert batch["image"].shape == (1, 2, S, S) and batch["slice_index"].shape == (1, 2)
    assert isinstance(batch["name"], str) and isinstance(batch["class_id"], int)
    seen = []
    for rank in range(2):
        loader = make_loader(ds, distributed=True, num_replicas=2, rank=rank, shuffle=True, seed=0)
        set_epoch(loader, 1)
        seen.append([(b["name"], b["class_id"]) for b in loader])
    assert len(seen[0]) == len(seen[1]) == (len(ds) + 1) // 2
    with pytest.raises(ValueError, match="batch_size=1"):
        collate([ds[0], ds[1]])


def test_combined_chunked_loading_bounds_residency(phantom_caches):
    cases, unified = open_caches([phantom_caches["kits"], phantom_caches["btcv"], phantom_caches["msd"]])
    assert len(cases) == 9 and unified[1] == "kidney" and unified[4] == "spleen"
    ds = ICLDataset(cases, video_length=2, chunk_size=2, seed=0)
    assert ds.num_chunks == 5
    length = len(ds)
    visited = set()
    for epoch in range(ds.num_chunks):
        ds.set_epoch(epoch)
        assert len(ds) == length  # fixed, so a DistributedSampler stays valid
        chunk_ids = {cases[i].id for i in ds.chunk_cases(epoch)}
        for i in range(length):
            s = ds[i]
            assert s["name"] in chunk_ids
            assert len(ds.resident_ids()) <= 2
        assert set(ds.resident_ids()) == chunk_ids
        visited |= chunk_ids
    assert visited == {c.id for c in cases}  # one round of chunks covers every case
    classes = {ds[i]["class_id"] for e in range(ds.num_chunks) if not ds.set_epoch(e) for i in range(length)}
    assert classes <= set(unified) and len(classes) > 3


def test_combined_ids_stay_unique(phantom_caches):
    cases, unified = open_caches([phantom_caches["msd"], phantom_caches["nnunet"]])
    ids = [c.id for c in cases]
    assert len(set(ids)) == 6 and "msd/phantom_001" in ids and "nnunet/phantom_001" in ids
    assert unified == dict(enumerate(SHAPES, start=1)) and make_splits(ids, 2, 0)
