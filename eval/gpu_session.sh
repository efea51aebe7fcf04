#!/usr/bin/env bash
# The GPU checks, prepared as one device call (one call may run 10 minutes; a session is lent ~15
# minutes of GPU time in all, the machine's start included):
#   1. eval/gpu_parity.py: the engine on CUDA against transformers, CUDA graph and eager (~1 min);
#   2. eval/bench_throughput.py --gpu: paligemma-3b-224 architecture, 2,000 images, vlmbatch against
#      transformers; then vlmbatch once more without the CUDA graph; then at 32 and 128 slots. The
#      benchmark rewrites its JSON after each of these, so a run cut off by the time limit keeps
#      what it measured.
# Results go to $OUT (the device tool's folder that comes back), else ./gpu_results. Run from the
# repository root. The machine's own torch is used. Its transformers (5.17 when last read) is older than
# the oracle CI pins (5.23, see pyproject.toml), and the machine cannot fetch packages. So wheels found
# in .whl/ (ignored by git) are unpacked into a temporary folder put first on the path; nothing else is
# installed. Prepare them here, then name .whl in the device call's carry:
#   pip download --no-deps transformers==5.23.0 -d .whl      # 13 MB, pure Python
# (seen working with that machine's huggingface_hub 1.33, tokenizers 0.23 and safetensors 0.8 under
# torch 2.11 on a CPU: the whole test suite passed). Without .whl/ the machine's transformers is the
# oracle and the baseline; eval/gpu_parity.py says why its greedy checks still hold.
# GPU_SESSION_SECONDS (default 540) bounds the whole script.
set -o pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    carried=$(mktemp -d)
    if python3 -m pip install -q --no-deps --no-index --target "$carried" .whl/*.whl 2>&1 | tail -3; then
        export PYTHONPATH=$carried:$PYTHONPATH
    else
        echo "carried wheels did not install; using the machine's own packages"
    fi
fi
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
