#!/usr/bin/env bash
# What one call on a 2-GPU machine checks for multi-GPU training, results under $OUT:
#   env.txt         the GPUs, and nccl4py's version and a unique id (the bindings load)
#   gpu-multi.txt   tests/test_gpu_multi.py (2 GPUs at B == 1 GPU at 2B, ZeRO-1 == DP, resume
#                   from a 2-GPU checkpoint == uninterrupted), through `gptc train --gpus 2`
#   bench.txt       `gptc bench --gpus 2 --zero1` of PRESET (default gpt2) at BATCH per GPU, fp32:
#                   multi_gpu.{json,md} under bench/
# Usage: OUT=dir GPTC_COMMIT=abc1234 [TEST_S=900] [BENCH_S=900] [NCCL_DEBUG=INFO] bash benchmarks/multi_gpu_check.sh [PRESET [BATCH]]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GPTC_COMMIT=${GPTC_COMMIT:-unknown}
preset=${1:-gpt2}
batch=${2:-8}
(nvidia-smi -L; env | grep -E "^NCCL_|MULTICAST|NVSHMEM" ; python3 -c "import nccl.core as n; print('nccl4py', n.__version__, len(bytes(n.get_unique_id())), 'byte id')") \
    > "$OUT/env.txt" 2>&1
timeout "${TEST_S:-900}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -x tests/test_gpu_multi.py \
    > "$OUT/gpu-multi.txt" 2>&1
echo "exit $?" >> "$OUT/gpu-multi.txt"
timeout "${BENCH_S:-900}" python3 -m gptc bench --preset "$preset" --batch "$batch" --gpus 2 --zero1 --out "$OUT/bench" \
    > "$OUT/bench.txt" 2>&1
echo "exit $?" >> "$OUT/bench.txt"
tail -n 25 "$OUT"/*.txt
