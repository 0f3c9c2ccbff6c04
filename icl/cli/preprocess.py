"""Preprocess a dataset once into a slices-first cache (:mod:`icl.data.preprocess`): the model's frames and labels.

    python -m icl.cli.preprocess --dataset kits --data_path datasets/kits --cache cache/kits --image_size 128
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from icl.data.frames import WINDOW_CHOICES, parse_window
from icl.data.preprocess import preprocess_dataset
from icl.data.readers import LAYOUTS
from icl.errors import InputError, report
from icl.options.spec import OneLineParser, parse_one_line


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m icl.cli.preprocess", description=__doc__.split("\n\n")[0],
                      exit_on_error=False)
    p.add_argument("--dataset", required=True, choices=LAYOUTS,
                   help="dataset layout (phantom: generated phantoms, in whichever layout the folder holds)")
    p.add_argument("--data_path", required=True, help="dataset root folder")
    p.add_argument("--cache", required=True, help="cache folder (index.json and one folder per case)")
    p.add_argument("--image_size", type=int, default=128, help="in-plane size in pixels (default: 128)")
    p.add_argument("--label_mode", default=None, help="KiTS: per_class | seed (default: the reader's)")
    p.add_argument("--modality", type=int, default=None, help="MSD/nnU-Net: input channel (default: the reader's)")
    p.add_argument("--window", default=None,
                   help=f"{' | '.join(WINDOW_CHOICES)} | 'lo,hi' in HU, negative values too: "
                        "--window -100,200 (default: the dataset's CT window, or MR percentiles)")
    try:
        a = parse_one_line(p, argv)
        opts: dict[str, Any] = {}
        if a.label_mode is not None:
            opts["label_mode"] = a.label_mode
        if a.modality is not None:
            opts["modality"] = a.modality
        if a.image_size < 8:
            raise InputError("--image_size", f"must be >= 8, got {a.image_size}")
        window = parse_window(a.window) if a.window else None
        cases = preprocess_dataset(a.dataset, a.data_path, a.cache, a.image_size, window, **opts)
    except InputError as e:
        return report(e)
    print(f"cached {len(cases)} cases in {a.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
