#!/usr/bin/env bash
# The GPU checks, prepared as one device call (a session is lent ~15 minutes of GPU time in all):
#   1. eval/gpu_parity.py: the engine on CUDA against transformers, CUDA graph and eager (~1 min);
#   2. eval/bench_throughput.py --gpu: paligemma-3b-224 architecture, 2,000 images, vlmbatch against
#      transformers, then vlmbatch at 32 and 128 slots (~6 min);
#   3. the same vlmbatch run with --no-cuda-graph, for what the graph buys.
# Results go to $OUT (the device tool's folder that comes back), else ./gpu_results. Run from the
# repository root; nothing is installed (the machine's own torch and transformers are used).
set -o pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
work=${BENCH_WORKDIR:-/tmp/vlmbatch_gpu_bench}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/nvidia_smi.txt"

timeout 180 python3 eval/gpu_parity.py --json "$out/gpu_parity.json" 2>&1 | tee "$out/gpu_parity.log" || status=1

timeout 480 python3 eval/bench_throughput.py --gpu --sweep 32,128 --workdir "$work" \
    --json "$out/throughput_gpu.json" 2>&1 | tee "$out/throughput_gpu.log" || status=1

if [ -d "$work/images" ]; then
    rm -rf "$work/no-graph.parquet" "$work/no-graph.parquet.parts"
    start=$EPOCHREALTIME
    timeout 120 python3 -m vlmbatch caption "$work/images" --out "$work/no-graph.parquet" --model "$work/checkpoint" \
        --max-new-tokens 32 --batch-size 64 --device cuda --quiet --no-cuda-graph 2>&1 | tee "$out/no_graph.log" || status=1
    python3 -c "import sys; print(f'vlmbatch --no-cuda-graph, 64 slots, whole process: {float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" \
        "$start" "$EPOCHREALTIME" | tee -a "$out/no_graph.log"
fi
exit $status
