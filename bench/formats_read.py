"""Reading and writing each format (#33) on a real scan, against NIfTI in the same run: INIA19's T1 (168 x 206 x
128) converted to NRRD, MetaImage and a DICOM series (int16 in 64ths), its NeuroMaps atlas to a Slicer
segmentation; each read with ``Scan.open`` to its canonical voxels (what the engine's frames are cut from), each
written with the one label-map writer. Checks that every format reads as the NIfTI copy, voxel for voxel.

    .venv/bin/python bench/formats_read.py --data ../shared/data/inia19 [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.format_writers import (segment, write_dicom_series, write_metaimage, write_nifti,  # noqa: E402
                                  write_nrrd, write_seg_nrrd)
from icl.data.frames import Scan  # noqa: E402
from icl.report.label_map import write_label_map  # noqa: E402

SLOPE = 1 / 64


def seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the INIA19 folder")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    t1 = nib.load(str(args.data / "inia19-t1-brain.nii.gz"))
    image, affine = np.asarray(t1.dataobj, dtype=np.float32), t1.affine
    atlas = np.asarray(nib.load(str(args.data / "inia19-NeuroMaps.nii.gz")).dataobj).astype(np.int16)
    quantised = (np.round(image / SLOPE) * SLOPE).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scans = {"NIfTI .nii.gz": (write_nifti(image, affine, root / "t1.nii.gz"), None),
                 "NRRD (gzip)": (write_nrrd(image, affine, root / "t1.nrrd"), "NIfTI .nii.gz"),
                 "MetaImage .mha (raw)": (write_metaimage(image, affine, root / "t1.mha"), "NIfTI .nii.gz"),
                 "NIfTI .nii.gz, 64ths": (write_nifti(quantised, affine, root / "q.nii.gz"), None),
                 "DICOM series (128 files)": (write_dicom_series(quantised, affine, root / "T1", slope=SLOPE,
                                                                 modality="MR"), "NIfTI .nii.gz, 64ths")}
        values = sorted(int(v) for v in np.unique(atlas) if v > 0)[:20]
        small = np.where(np.isin(atlas, values), atlas, 0).astype(np.int16)
        scans["Slicer .seg.nrrd (20 segments)"] = (write_seg_nrrd(
            small, affine, root / "atlas.seg.nrrd", [segment(f"s{v}", f"label {v}", v) for v in values]), None)
        print("| read (Scan.open + canonical voxels) | seconds | vs NIfTI | same voxels as its NIfTI copy |")
        print("|---|---|---|---|")
        base = None
        for name, (path, copy) in scans.items():
            took = seconds(lambda: np.asarray(Scan.open(path).canonical).sum(), args.repeat)
            base = base or took
            same = "—" if copy is None else str(np.array_equal(np.asarray(Scan.open(path).canonical),
                                                             np.asarray(Scan.open(scans[copy][0]).canonical)))
            print(f"| {name} | {took:.3f} | {took / base:.2f}x | {same} |")
        print("\n| write the atlas (724 values, int16) | seconds | vs NIfTI |")
        print("|---|---|---|")
        base = None
        header = nib.load(str(args.data / "inia19-NeuroMaps.nii.gz")).header
        for name in ("out.nii.gz", "out.nrrd", "out.mha", "out.seg.nrrd"):
            took = seconds(lambda: write_label_map(atlas, affine, header, root / name, dtype=np.int16), args.repeat)
            base = base or took
            print(f"| {name} | {took:.3f} | {took / base:.2f}x |")


if __name__ == "__main__":
    main()
