#!/usr/bin/env bash
# Install lerobot 0.6.1 (pi0, pi0.5, SmolVLA) next to the CPU torch 2.13 that qvla_compiler uses, offline-capable
# from PyPI only, without ever replacing torch:
#
#   bash scripts/install_lerobot.sh            # into the running Python environment
#   PYTHON=/path/to/python bash scripts/install_lerobot.sh
#   TARGET=/some/dir bash scripts/install_lerobot.sh   # into a folder instead (pip --target); use it with
#                                                      # PYTHONPATH=/some/dir, the environment stays untouched
#
# Why not `pip install lerobot`: lerobot 0.6.1 pins torch<2.12 (pip would swap torch for a CUDA build plus ~15
# nvidia-* packages) and declares Python >= 3.12. So every package is installed with --no-deps and a constraints
# file pinning the torch already installed, lerobot with --ignore-requires-python, and its five PEP 695 lines are
# rewritten for Python 3.11 (scripts/patch_lerobot_py311.py). torchvision's PyPI wheel links CUDA libraries; the
# import shim for a CPU-only torch lives in qvla_compiler.integrations.lerobot (no .pth file, nothing global).
set -euo pipefail

PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$(date +%s)

torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
numpy_version="$("$PY" -c 'import numpy; print(numpy.__version__)')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\nnumpy==%s\n' "$torch_version" "$numpy_version" >"$constraints"

# Exactly the set that imports lerobot's pi0 / pi0.5 / SmolVLA policies on Python 3.11 (versions resolved once, by
# hand, against lerobot 0.6.1's and transformers 5.5.4's requirements). Already-installed packages at these versions
# are left alone; numpy, torch, pillow, safetensors, pyyaml, requests, tqdm, packaging come from qvla_compiler's set.
PKGS=(
  "transformers==5.5.4" "tokenizers==0.22.2" "huggingface-hub==1.20.0" "hf-xet==1.8.0"
  "httpx==0.28.1" "httpcore==1.0.9" "h11==0.16.0" "anyio==4.12.0" "typer==0.20.0" "shellingham==1.5.4"
  "torchvision==0.28.0"
  "draccus==0.11.6" "mergedeep==1.3.4" "pyyaml-include==1.4.1" "toml==0.10.2"
  "opencv-python-headless==4.13.0.92" "einops==0.8.1" "termcolor==3.2.0" "gymnasium==1.2.2" "farama-notifications==0.0.4"
)

where=()
if [[ -n "${TARGET:-}" ]]; then
  mkdir -p "$TARGET"
  where=(--target "$TARGET" --upgrade)
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install --quiet --no-deps -c "$constraints" "${where[@]}" "${PKGS[@]}"
"$PY" -m pip install --quiet --no-deps --ignore-requires-python -c "$constraints" "${where[@]}" "lerobot==0.6.1"
"$PY" "$HERE/patch_lerobot_py311.py" ${TARGET:+"$TARGET"}

# torch must be the one we started with; then the integration must import every policy it wraps.
"$PY" - "$torch_version" <<'EOF'
import sys
import torch
want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"install_lerobot.sh: torch changed to {torch.__version__} (was {want}); reinstall torch=={want}")
from qvla_compiler.integrations.lerobot import POLICIES, _import
found = [getattr(_import(module), name).__name__ for name, (module, _, _) in POLICIES.items()]  # raises if one is gone
print("install_lerobot.sh: torch", torch.__version__, "| lerobot policies:", ", ".join(sorted(found)))
EOF
echo "install_lerobot.sh: done in $(( $(date +%s) - start )) s"
