#!/usr/bin/env bash
# The quick side-by-side comparison on a lent GPU machine (issue 6, item 6), in two steps.
#
#   bash benchmarks/gpu_quick.sh prepare   # here, on the development machine (needs the package index)
#   bash benchmarks/gpu_quick.sh run       # there, as the device tool's one command, carrying .gpu-carry
#   bash benchmarks/gpu_quick.sh dry-run --rows jabs   # here, on the CPU, with python3 from a venv that
#                                          # has the reference's packages and ours: checks the script
#
# The GPU machine reaches no package index and takes at most 64 MiB of carried files. Its image
# already has jax/jaxlib with the CUDA plugin, numpy, scipy, scikit-learn, pandas, xarray, joblib,
# tqdm, h5py, matplotlib, numba, statsmodels and most of what the reference needs. "prepare"
# downloads, as Python 3.12 wheels, what it lacks for the reference's fitting (keypoint-moseq
# 0.8.1, jax-moseq 0.3.7, dynamax, tfp-nightly and their small compiled helpers) and copies the
# JABS recordings, all into .gpu-carry (in .gitignore). "run" installs those wheels into
# /tmp/site, lets the reference import with stand-ins for the plotting, widget, video and NWB
# packages its fitting never calls (_import_stand_ins.py; recorded in the results), and runs
# compare_reference.py --quick with both implementations on the GPU's JAX (both sides use that
# one jax; the reference picks its own GPU defaults, e.g. the parallel Kalman sampler). The
# table and JSON go to $OUT (written after each row, so a run cut short keeps its rows).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
# keep in step with the reference pins in compare_reference.py (keypoint-moseq 0.8.1, jax-moseq 0.3.7)
PURE=(keypoint-moseq==0.8.1 jax-moseq==0.3.7 dynamax==1.0.2 tfp-nightly==0.26.0.dev20261027
      commentjson==0.9.0 lark-parser==0.7.8 decorator==5.3.1 gast==0.7.0)  # pure Python (some only as sdists)
COMPILED=(optree==0.20.0 dm-tree==0.1.10)  # CPython 3.12 x86_64 wheels, for the GPU image's python3
STAND_INS=sleap_io,pynwb,ndx_pose,fastprogress,vidio,plotly,cytoolz,panel

case "${1:-}" in
prepare)
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/real"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
             manylinux_2_24_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
    python3 -m pip wheel --quiet --no-deps -w "$CARRY/wheels" "${PURE[@]}"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$CARRY/wheels" "${COMPILED[@]}"
    cp -r ../shared/data/real/jabs_openfield "$CARRY/real/"
    du -sh "$CARRY"
    echo "now, with the device tool: run(command='bash benchmarks/gpu_quick.sh run', carry=['$CARRY'], timeout_s=580)"
    ;;
run|dry-run)
    # dry-run: the same on this machine's CPU, with the reference's packages already installed for
    # python3 (and the stand-ins for the rest): checks the script and the stand-ins, not the GPU
    if [ "$1" = dry-run ]; then
        OUT=${OUT:-benchmarks/results/gpu-dry-run}
        mkdir -p "$OUT"
    fi
    : "${OUT:?run this on the device machine, where OUT is set}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv" || echo "no nvidia-smi"
    if [ "$1" = run ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/wheels/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1 KPMS_BENCH_STAND_INS=$STAND_INS
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/jax.txt"
    # a reference that does not import on the image's jax still leaves our side's GPU numbers
    sides=(--reference-python "$(command -v python3)")
    if ! (cd benchmarks && python3 -c "import _compare_worker as w; w._import_stand_ins(); import keypoint_moseq") \
            > "$OUT/reference-import.txt" 2>&1; then
        tail -20 "$OUT/reference-import.txt"
        echo "the reference does not import here: running ours only (no ratios); exit status 1"
        sides=(--ours-only)
    fi
    timeout "${GPU_QUICK_LIMIT:-450}" python3 benchmarks/compare_reference.py --quick --timeout 200 \
        --ours-python "$(command -v python3)" "${sides[@]}" \
        --real-dir "$CARRY/real" --out "$OUT/compare-quick-gpu.json" "${@:2}" 2>&1 | tee "$OUT/compare-quick-gpu.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_quick.sh {prepare|run|dry-run} [compare_reference.py options]" >&2
    exit 2
    ;;
esac
