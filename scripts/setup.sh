#!/usr/bin/env bash
# Create .venv and install facemill with its test extras. Safe to rerun.
#   FACEMILL_TORCH   the torch requirement to install first (default torch==2.13.0: a CPU build on the
#                    project's dev/CI machines; on a GPU box use e.g. "torch==2.5.1" from the CUDA index)
#   PYTHON           interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${FACEMILL_TORCH:-torch==2.13.0}"
# s3fs (a dependency) and moto[server] (test extra) come in one resolver run, which keeps aiobotocore's pin.
python -m pip install -q -e ".[test]"
# facenet-pytorch pins torch<2.3, so without its deps: used only to cross-check weights and as the
# benchmark's speed anchor, never imported by facemill itself.
python -m pip install -q --no-deps facenet-pytorch==2.6.0
python -c "import ray, torch, pyarrow, s3fs, moto; print(f'facemill env ready: ray {ray.__version__}, torch {torch.__version__}')"
