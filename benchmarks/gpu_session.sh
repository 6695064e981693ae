#!/usr/bin/env bash
# What one call on a GPU machine checks, from the repository root, results under $OUT:
#   gpu-tests.txt   the GPU test suite (pytest -m gpu)
#   dev.txt         the dev/ harness of every kernel family (check against NumPy, time variants)
#   compare.md      gptc bench of this tree against a baseline tree, alternating (no regression)
#   demo.txt        the main job, `gptc demo --device gpu` (compile, train, sample)
#   presets.txt     each preset of PRESETS trained STEPS steps on the bundled corpus (loss
#                   curves under all/train-NAME), then `gptc bench` of it (all/bench-NAME)
#   results.tgz     everything, logs included
# Usage: bash benchmarks/gpu_session.sh [tests] [dev] [demo] [presets] [compare BASELINE_DIR BASELINE_COMMIT]
# (default: tests and dev). Set GPTC_COMMIT to this tree's commit (a copy has no .git).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/all"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GPTC_COMMIT=${GPTC_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/all/gpu.txt" 2>&1
steps=("$@")
((${#steps[@]})) || steps=(tests dev)
status=0
i=0
while ((i < ${#steps[@]})); do
    case "${steps[i]}" in
        tests)
            python3 -m pytest -m gpu -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/gpu-tests.txt" | tail -40
            ((PIPESTATUS[0] == 0)) || status=1 ;;
        dev)
            (failed=0
             for family in pointwise row reduce matmul attention attention_bwd scatter; do
                 echo "== dev/kernel.py --family $family"; python3 dev/kernel.py --family "$family" || failed=1
             done; exit $failed) 2>&1 | tee "$OUT/dev.txt" | tail -60
            ((PIPESTATUS[0] == 0)) || status=1 ;;
        demo)
            rm -rf "$OUT/all/demo"
            python3 -m gptc demo --device gpu --out "$OUT/all/demo" 2>&1 | tee "$OUT/demo.txt" | tail -25
            ((PIPESTATUS[0] == 0)) || status=1 ;;
        presets)
            (failed=0
             for name in ${PRESETS:-modular giantgpt llama}; do
                 echo "== gptc train --preset $name --steps ${STEPS:-2000}"
                 python3 -m gptc train --preset "$name" --device gpu --steps "${STEPS:-2000}" \
                     --out "$OUT/all/train-$name" 2>&1 | grep -v "^step .*ETA" || failed=1
                 echo "== gptc bench --preset $name"
                 python3 -m gptc bench --preset "$name" --what train --no-kernels \
                     --out "$OUT/all/bench-$name" 2>&1 | tail -25 || failed=1
             done; exit $failed) 2>&1 | tee "$OUT/presets.txt" | tail -80
            ((PIPESTATUS[0] == 0)) || status=1 ;;
        compare)
            base=${steps[i + 1]}; base_commit=${steps[i + 2]}; i=$((i + 2))
            python3 benchmarks/compare_commits.py --baseline "$base" --baseline-commit "$base_commit" \
                --commit "$GPTC_COMMIT" --out "$OUT/all/compare" 2>&1 | tee "$OUT/all/compare-log.txt" | tail -20
            ((PIPESTATUS[0] == 0)) || status=1
            cp "$OUT/all/compare/compare.md" "$OUT/compare.md" 2>/dev/null || status=1 ;;
        *) echo "unknown step ${steps[i]}"; status=2 ;;
    esac
    i=$((i + 1))
done
cp "$OUT"/*.txt "$OUT"/*.md "$OUT/all/" 2>/dev/null
tar -czf "$OUT/results.tgz" --exclude=checkpoints -C "$OUT" all  # checkpoints stay behind (size)
exit $status
