#!/usr/bin/env bash
# One-shot GPU check: on a fresh CUDA machine, build the extension for this card
# only, run the GPU tests, run the benchmark suites at the paper's sizes, and
# write raw results (pytest-benchmark JSON with card, versions and date; the
# markdown report; the memory-vs-depth plot; logs) into the folder given as $1.
#   bash benchmarks/gpu_check.sh /path/to/results
# Each step has its own time limit and its own output file, so a slow step
# costs only its own results; the whole script stays under 9 minutes (limits add up to 525 s).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
echo "== build for sm_${arch/./} (torch $(python -c 'import torch; print(torch.__version__)'))"
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} timeout 150 python setup.py build_ext --inplace \
  >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }

echo "== GPU tests (one Triton config per kernel: correctness needs no tuning, and it compiles little)"
FUSED_PREACT_TRITON_AUTOTUNE=0 timeout 100 python -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" \
  >"$out/gpu_tests.log" 2>&1 || status=1
tail -5 "$out/gpu_tests.log"

# suite:time limit in seconds
jsons=()
for suite in unit:50 train_step:110 memory:45 op:70; do
  name=${suite%%:*}
  echo "== benchmark suite $name"
  timeout "${suite##*:}" python -m pytest "benchmarks/test_bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/gpu_$name.json" >"$out/gpu_$name.log" 2>&1 || { status=1; tail -5 "$out/gpu_$name.log"; }
  [ -s "$out/gpu_$name.json" ] && jsons+=("$out/gpu_$name.json")
done

if [ ${#jsons[@]} -gt 0 ]; then
  python benchmarks/report.py "${jsons[@]}" --out-dir "$out" --name gpu || status=1
  [ -f "$out/gpu.md" ] && head -60 "$out/gpu.md"
fi
exit $status
