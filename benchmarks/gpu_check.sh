#!/usr/bin/env bash
# One-shot GPU check (DESIGN.md section 6): on a fresh CUDA machine, build the
# extension for this card only, run the GPU tests, run the memory and throughput
# comparison, and write raw results into the folder given as $1.
#   bash benchmarks/gpu_check.sh /path/to/results     (about 5 minutes on an H100)
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

echo "== memory and throughput (ResNet-164/1001, batch 128)"
python benchmarks/gpu_compare.py --out "$out/gpu_compare.json" 2>&1 | tee "$out/gpu_compare.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
