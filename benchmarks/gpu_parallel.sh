#!/usr/bin/env bash
# One call on a 2-GPU machine that checks and measures as much as fits in ~10 minutes, the
# two GPUs working side by side (results under $OUT, logs under $OUT/all):
#   GPU 0: the GPU tests of the fp32 kernels (regressions), then `gptc bench` of gpt2 in bf16
#          (train; the PyTorch peer, torch.compile + CUDA graph, in bf16 autocast)
#   GPU 1: the GPU tests of the bf16 and matrix-vector matmuls, attention, decode, sampling and bundles,
#          then `gptc bench --what decode` of hipgpt (and gpt2 with DECODE_GPT2=1; batch 1, 8,
#          64; PyTorch peers) and `gptc bench` of hipgpt's fp32 training step (no regression)
#   both:  tests/test_gpu_multi.py (2 GPUs), then benchmarks/multi_gpu.py: 1 and 2 GPUs,
#          gpt2 and the mid model in bf16 (and ZeRO-1)
# Each part has its own time limit (seconds, env *_S) so that one that hangs costs only
# itself. Usage: OUT=dir GPTC_COMMIT=abc1234 bash benchmarks/gpu_parallel.sh
# The 2-GPU tests need nccl4py, which the GPU machine lacks: put its wheel in .wheels/ first
# (`pip download nccl4py --no-deps --python-version 3.12 --only-binary=:all: -d .wheels`; the
# folder is not tracked) and carry it to the machine.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/all"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GPTC_COMMIT=${GPTC_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/all/gpu.txt" 2>&1
python3 -m pip install --no-deps -q .wheels/nccl4py-*.whl > "$OUT/all/pip.txt" 2>&1
run() {  # run GPU SECONDS LOG COMMAND...: one part on one GPU (or "0,1"), its own kernel cache
    local gpu=$1 secs=$2 log=$3; shift 3
    echo "== $* (GPU $gpu, limit ${secs}s)" >> "$OUT/all/$log"
    CUDA_VISIBLE_DEVICES=$gpu GPTC_CACHE_DIR=/tmp/gc-${gpu/,/-} timeout "$secs" "$@" >> "$OUT/all/$log" 2>&1
    echo "== exit $?" >> "$OUT/all/$log"
}
PYTEST_GPU="python3 -m pytest -m gpu -q -p no:cacheprovider -rfE"  # (timeout runs programs, not shell functions)
# Phase 1: the GPU tests, split over the two GPUs.
run 0 ${TESTS_S:-240} tests0.txt $PYTEST_GPU tests/test_gpu_kernels.py tests/test_gpu_train.py tests/test_device_gpu.py \
    tests/test_option_gqa_local.py tests/test_option_linear.py tests/test_option_moe.py tests/test_option_norms_gpu.py \
    tests/test_option_rope.py tests/test_gpu_batched_dispatch.py &
run 1 ${TESTS_S:-240} tests1.txt $PYTEST_GPU tests/test_gpu_mma.py tests/test_gpu_gemv.py tests/test_gpu_precision.py \
    tests/test_gpu_attention_bf16.py tests/test_gpu_decode.py tests/test_gpu_sampling.py tests/test_gpu_batch_sampling.py \
    tests/test_gpu_bundle.py tests/test_gpu_bench_decode.py &
wait
# Phase 2: benchmarks, one per GPU at a time (each GPU quiet while it is timed). NO_BENCH=1 skips it.
[[ -n ${NO_BENCH:-} ]] || {
(run 0 ${BENCH_S:-150} bench0.txt python3 -m gptc bench --preset gpt2 --precision bf16 --what train --no-kernels \
     --compare torch-cudagraphs --out "$OUT/all/bench-gpt2-bf16") &
(run 1 60 bench1.txt python3 -m gptc bench --preset hipgpt --what decode --out "$OUT/all/decode-hipgpt"
 run 1 70 bench1.txt python3 -m gptc bench --preset hipgpt --no-kernels --compare torch-cudagraphs \
     --out "$OUT/all/bench-hipgpt-fp32"
 [[ -z ${DECODE_GPT2:-} ]] || run 1 140 bench1.txt python3 -m gptc bench --preset gpt2 --what decode --out "$OUT/all/decode-gpt2") &
wait
}
# Phase 3: two GPUs together: the 2-GPU tests, then the scaling of gpt2 and the mid model in bf16.
run 0,1 ${MULTI_S:-50} multi.txt $PYTEST_GPU -x tests/test_gpu_multi.py
[[ -n ${NO_BENCH:-} ]] || run 0,1 ${SCALING_S:-150} multi.txt python3 benchmarks/multi_gpu.py --gpus 2 --steps 20 \
    --models gpt2,mid --out "$OUT/all/multi"
for f in "$OUT"/all/*.txt; do echo "##### $(basename "$f")"; grep -E "passed|failed|error|FAILED|ERROR|== exit|ms|TFLOP|tok" "$f" | tail -25; done > "$OUT/summary.txt"
tar -czf "$OUT/results.tgz" --exclude=checkpoints -C "$OUT" all
cat "$OUT/summary.txt" | tail -120
