#!/usr/bin/env bash
# Create the MACE peer environment (.venv-mace) used by the benchmarks, if it is missing.
#
# MACE (mace-torch) pins e3nn 0.4.4, which conflicts with est_calc's e3nn 0.6.0, so the peer
# lives in its own virtual env. torch is installed FIRST and pinned, so pip never resolves a
# different (multi-GB CUDA) torch build when mace-torch is installed afterwards.
#
# Usage: bash benchmarks/setup_mace_env.sh [VENV_DIR]   (default: .venv-mace at the repo root)
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0; for a CUDA machine
# e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-mace}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ -x "$VENV/bin/python" ] && \
   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$VENV/bin/python" -c "import mace.modules" 2>/dev/null; then
    echo "MACE env already present: $VENV"
    exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip arguments on purpose
"$VENV/bin/pip" install -q $TORCH_SPEC
"$VENV/bin/pip" install -q mace-torch

# e3nn 0.4.4 reads its constants with torch.load; torch >= 2.6 needs this to allow it.
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$VENV/bin/python" -c \
    "import torch, mace; from mace.modules import ScaleShiftMACE; print('MACE env ready: torch', torch.__version__)"
