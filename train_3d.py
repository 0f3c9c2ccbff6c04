#!/usr/bin/env python
"""Train SAM2 for in-context 3D medical segmentation (MedSAM2-ICL compatible flags).

    python train_3d.py -exp_name kits_icl -dataset kits -data_path datasets/kits -pretrain none -val_freq 5
    torchrun --nproc_per_node 2 train_3d.py -distributed True ...

All logic lives in icl.config and icl.engine.train.loop; bad input prints one ``error: ...`` line and exits 2.
"""
import sys

from icl.engine.train.loop import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
