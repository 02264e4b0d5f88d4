#!/usr/bin/env bash
# The GPU measurement of issue 15 item 4 as one call on a lent device machine (run from the repo root there,
# with `carry: [".whl"]` after benchmarks/device/fetch-wheels.sh ran here):
#
#   run(command="bash benchmarks/device/gpu-check.sh", carry=[".whl"], timeout_s=540)
#
# It installs the carried wheels beside the machine's own torch, then runs benchmarks/gpu_scoring.py on the
# shipped model: slices/s per batch size (model pass and end to end), peak GPU memory, bf16 against fp32, and
# a study cut into 4 series scored one series at a time and all at once (rows per model pass), into
# $OUT/gpu-scoring.json and $OUT/gpu-scoring.log. SLICES (default 128) and BATCHES (default 16,64) keep it
# inside one call's limit: the end-to-end parts run the cues on the CPU (~0.1-0.6 s per slice), and each row
# is printed as it ends, so a run cut short keeps what it measured.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-scoring.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu-scoring.log"
source_args=(); [ -d .whl/lidc-idri-0001 ] && source_args=(--source .whl/lidc-idri-0001)
timeout 480 python3 benchmarks/gpu_scoring.py "${source_args[@]}" --slices "${SLICES:-128}" --batch-sizes "${BATCHES:-16,64}" --series 4 \
    --repeats 2 --profile --json "$OUT/gpu-scoring.json" 2>&1 | tee -a "$OUT/gpu-scoring.log"
