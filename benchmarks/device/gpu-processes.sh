#!/usr/bin/env bash
# Worker processes sharing one GPU (issue 15 item 4), as one call on a lent device machine, after
# benchmarks/device/fetch-wheels.sh ran here:
#
#   run(command="bash benchmarks/device/gpu-processes.sh", carry=[".whl"], timeout_s=420)
#
# benchmarks/gpu_processes.py for 1, 2, 4, 8, 12 and 16 processes (PROCESSES), each scoring its own copy of a
# 64-slice study (SLICES), then 4 and 16 processes forked as Celery's prefork pool forks them (FORKED), into
# $OUT/gpu-processes.json and .log; nvidia-smi dmon samples the GPU's load every second into $OUT/dmon.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi dmon -s um -d 1 > "$OUT/dmon.log" 2>&1 &
dmon=$!
source_args=(); [ -d .whl/lidc-idri-0001 ] && source_args=(--source .whl/lidc-idri-0001)
timeout 380 python3 benchmarks/gpu_processes.py "${source_args[@]}" --processes "${PROCESSES:-1,2,4,8,12,16}" \
    --forked "${FORKED:-4,16}" --slices "${SLICES:-64}" --json "$OUT/gpu-processes.json" 2>&1 | tee "$OUT/gpu-processes.log"
kill "$dmon" 2>/dev/null
nproc; free -g | head -2
