"""Write a synthetic dataset (deterministic CT/MR phantoms, :mod:`icl.data.phantom`) in the KiTS, BTCV, MSD or
nnU-Net layout.

    python -m icl.cli.phantom --out datasets/phantom --layout kits --cases 4 --seed 0 --shape 96,96,40
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from icl.data.phantom import DEFAULT_SHAPE, make_phantom_dataset
from icl.data.readers import LAYOUTS
from icl.data.vocabulary import SHAPES
from icl.errors import InputError, report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m icl.cli.phantom")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--cases", type=int, default=4, help="number of cases (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="same seed, identical volumes (default: 0)")
    p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                   help=f"X,Y,Z voxels, Z = slices (default: {','.join(map(str, DEFAULT_SHAPE))})")
    p.add_argument("--classes", default=None, help=f"comma-separated shapes from {','.join(SHAPES)} "
                                                   "(default: ellipsoid,twin_blobs,box for kits, all for "
                                                   "the other layouts)")
    a = p.parse_args(argv)
    try:
        try:
            shape = tuple(int(s) for s in a.shape.split(","))
        except ValueError:
            raise InputError("--shape", f"expected X,Y,Z integers, got {a.shape!r}") from None
        classes = a.classes.split(",") if a.classes else None
        out = make_phantom_dataset(a.out, a.layout, a.cases, a.seed, shape, classes)
    except InputError as e:
        return report(e)
    print(f"wrote {a.cases} {a.layout} phantom cases to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
