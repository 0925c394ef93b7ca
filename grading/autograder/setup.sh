#!/usr/bin/env bash
# Gradescope runs this once, as root, in /autograder/source (the unzipped bundle of
# tools/make_autograder.py), when it builds the autograder image. It has internet.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="${AUTOGRADER_ROOT:-/autograder}"

if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv python3-pip
fi
python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/python" -m pip install --quiet --upgrade pip
# CPU wheels of torch: Gradescope's machines have no GPU, and they are much smaller.
"$ROOT/venv/bin/python" -m pip install --quiet -r requirements.txt \
  --extra-index-url https://download.pytorch.org/whl/cpu

# Cache the ImageNet weights the tests can use (they are skipped without them), where
# tools/grade.py looks by default: ../shared/weights next to the grader.
mkdir -p "$ROOT/shared/weights"
TORCH_HOME="$ROOT/shared/weights" "$ROOT/venv/bin/python" - <<'PY' || echo "warning: weights not cached; the tests that need them will be skipped"
import torchvision
torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
torchvision.models.regnet_x_400mf(weights=torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V1)
PY
