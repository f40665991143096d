#!/usr/bin/env bash
# Install lerobot 0.4.4 (the last release with GR00T N1.5, `GrootPolicy`) into a FOLDER, next to the CPU torch 2.13
# of the running Python, without touching that environment or torch:
#
#   TARGET=$HOME/.cache/qvla/lerobot-0.4.4 bash scripts/install_lerobot_groot.sh
#   PYTHONPATH=$HOME/.cache/qvla/lerobot-0.4.4 python -m pytest tests/integrations/test_lerobot_groot.py
#
# A folder, because lerobot 0.4.4 (GR00T N1.5, transformers 4.57) and lerobot 0.6.1 (pi0 / pi0.5 / SmolVLA,
# transformers 5.5, scripts/install_lerobot.sh) are one package at two versions: an environment holds one of them.
# Every package is installed with --no-deps and a constraints file pinning the installed torch (lerobot 0.4.4 pins
# torch<2.11). The list is what `import lerobot.policies.groot` needs on Python 3.11 (lerobot imports its dataset,
# video and motor stacks at config level); flash-attn is not installed (the tiny build uses SDPA attention).
set -euo pipefail

PY="${PYTHON:-python}"
TARGET="${TARGET:?set TARGET=<folder> (e.g. TARGET=\$HOME/.cache/qvla/lerobot-0.4.4)}"
start=$(date +%s)

torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
numpy_version="$("$PY" -c 'import numpy; print(numpy.__version__)')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\nnumpy==%s\n' "$torch_version" "$numpy_version" >"$constraints"

PKGS=(
  "lerobot==0.4.4" "transformers==4.57.6" "tokenizers==0.22.2" "huggingface-hub==0.36.2" "diffusers==0.35.2"
  "peft==0.17.1" "accelerate==1.10.1" "psutil==7.0.0" "importlib-metadata==8.7.0" "zipp==3.23.0"
  "dm-tree==0.1.9" "absl-py==2.3.1"
  "datasets==4.8.5" "pandas==2.3.3" "pyarrow==22.0.0" "dill==0.4.0" "multiprocess==0.70.18" "xxhash==3.6.0"
  "pytz==2025.2" "tzdata==2025.2" "imageio==2.37.0" "av==15.1.0" "pyserial==3.5" "deepdiff==8.6.1"
  "orderly-set==5.5.0" "jsonlines==4.0.0"
  "torchvision==0.28.0" "opencv-python-headless==4.13.0.92"
  "draccus==0.11.6" "mergedeep==1.3.4" "pyyaml-include==1.4.1" "toml==0.10.2"
  "einops==0.8.1" "termcolor==3.2.0" "gymnasium==1.2.2" "farama-notifications==0.0.4"
  "httpx==0.28.1" "httpcore==1.0.9" "h11==0.16.0" "anyio==4.12.0"
)
mkdir -p "$TARGET"
"$PY" -m pip install --quiet --no-deps --upgrade -c "$constraints" --target "$TARGET" "${PKGS[@]}"

# diffusers 0.35 (0.36 too) calls `logger` at import before defining it when torchao is installed without
# NF4Tensor (torchao >= 0.15, e.g. as qvla's benchmark dependency): GR00T's DiT then fails to import with
# "NameError: name 'logger' is not defined". Define it before that call (idempotent).
"$PY" - "$TARGET/diffusers/quantizers/torchao/torchao_quantizer.py" <<'PATCH'
import pathlib, sys
path = pathlib.Path(sys.argv[1])
src, line = path.read_text(), "logger = logging.get_logger(__name__)\n"
if 0 <= src.find("\n    _update_torch_safe_globals()") < src.find(line):
    at = src.find("\ndef _update_torch_safe_globals")
    path.write_text(src[:at] + "\n" + line + src[at:])
PATCH

PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$torch_version" <<'EOF'
import sys
import torch
if torch.__version__.split("+")[0] != sys.argv[1]:
    sys.exit(f"install_lerobot_groot.sh: torch changed to {torch.__version__}; reinstall torch=={sys.argv[1]}")
from qvla_compiler.integrations.lerobot_groot import import_groot
import_groot()
import lerobot
print("install_lerobot_groot.sh: torch", torch.__version__, "| lerobot", lerobot.__version__, "| GrootPolicy imports")
EOF
echo "install_lerobot_groot.sh: done in $(( $(date +%s) - start )) s; use it with PYTHONPATH=$TARGET"
