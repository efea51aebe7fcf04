#!/usr/bin/env bash
# The GPU checks, prepared as one device call (one call may run 10 minutes; a session is lent ~15
# minutes of GPU time in all, the machine's start included):
#   1. eval/gpu_parity.py: the engine on CUDA against transformers, CUDA graph and eager (~1 min);
#   2. eval/bench_throughput.py --gpu: paligemma-3b-224 architecture, 2,000 images, vlmbatch against
#      transformers; then vlmbatch once more without the CUDA graph; then at 32 and 128 slots. The
#      benchmark rewrites its JSON after each of these, so a run cut off by the time limit keeps
#      what it measured.
# Results go to $OUT (the device tool's folder that comes back), else ./gpu_results. Run from the
# repository root; nothing is installed (the machine's own torch and transformers are used).
# GPU_SESSION_SECONDS (default 540) bounds the whole script.
set -o pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
budget=${GPU_SESSION_SECONDS:-540}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/nvidia_smi.txt"

timeout 150 python3 eval/gpu_parity.py --json "$out/gpu_parity.json" 2>&1 | tee "$out/gpu_parity.log" || status=1

left=$((budget - SECONDS))
echo "benchmark: ${left} s left of ${budget}"
timeout "$left" python3 eval/bench_throughput.py --gpu --graph-ab --sweep 32,128 \
    --json "$out/throughput_gpu.json" 2>&1 | tee "$out/throughput_gpu.log" || status=1
exit $status
