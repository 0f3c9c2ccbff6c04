#!/usr/bin/env bash
# The real-anatomy recipe on one CUDA GPU (bench/gpu_train.py): 256 px, bf16, at most 8 minutes of training; writes
# the run, candidate.pth, train.log and step_rate.json into OUT and prints the step rate.
#   bench/gpu_train.sh OUT [IMG:LAB[,IMG:LAB]]        env: PYTHON (.venv/bin/python), MINUTES (8), GPU (0)
# Then measure OUT/candidate.pth as BENCHMARKS.md says (bench/real_anatomy.py --checkpoint ... --config
# medsam_lite_pool2, bench/cross_scan.py, bench/icl_switch.py).
set -euo pipefail
out=$(realpath -m "${1:?usage: bench/gpu_train.sh OUT [IMG:LAB[,IMG:LAB]]}")
cd "$(dirname "$0")/.."
volumes=${2:-../shared/data/inia19/inia19-t1-brain.nii.gz:../shared/data/inia19/inia19-NeuroMaps.nii.gz}
exec "${PYTHON:-.venv/bin/python}" bench/gpu_train.py --out "$out" --real-volumes "$volumes" \
    --minutes "${MINUTES:-8}" --gpu "${GPU:-0}"
