#!/usr/bin/env bash
# One-shot GPU check: on a fresh CUDA machine, build the extension for this card
# only, run the GPU tests, run the benchmark suite at the paper's sizes, and
# write raw results (pytest-benchmark JSON with card, versions and date; the
# markdown report; the memory-vs-depth plot; logs) into the folder given as $1.
#   bash benchmarks/gpu_check.sh /path/to/results
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
echo "== build for sm_${arch/./} (torch $(python -c 'import torch; print(torch.__version__)'))"
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} python setup.py build_ext --inplace >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }

echo "== GPU tests"
python -m pytest tests -m gpu -q --junitxml="$out/gpu_tests.xml" -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks at the paper's sizes (batch 128): memory and throughput vs eager, checkpoint, compile"
python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/gpu.json" \
  >"$out/gpu_bench.log" 2>&1
[ $? -eq 0 ] || { status=1; tail -30 "$out/gpu_bench.log"; }
python benchmarks/report.py "$out/gpu.json" --out-dir "$out" && tail -40 "$out/gpu.md"
exit $status
