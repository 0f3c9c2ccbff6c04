#!/usr/bin/env python
"""Evaluate in-context SAM2 on 3D volumes: per case × class Dice / IoU / HD95 / NSD at the original resolution.

    python eval_3d.py -dataset kits -data_path datasets/kits -checkpoint_path runs/kits_icl/best.pth \
        -config sam2.1_hiera_t -image_size 512 -num_support 8 -support_instance case_00028 -protocol both
    python eval_3d.py ... -all_checkpoints checkpoint/kits_icl_20260101_120000   # metric vs epoch

All logic lives in icl.engine.eval.evaluate; bad input prints one ``error: ...`` line and exits 2.
"""
import sys

from icl.engine.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
