#!/usr/bin/env bash
# The one GPU check: on a fresh CUDA machine, build the extension for this card
# only, run every Triton and CUDA test on CUDA tensors, run the benchmark
# suites at the paper's sizes, and leave raw results in OUT_DIR (env.json with
# card, versions and date; one log per step; junit XML; pytest-benchmark JSON;
# the markdown report and plot; summary.txt).
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # anywhere: the same steps at tiny sizes on the CPU
# Each step runs under its own time limit (SIGINT first, so pytest still writes
# its XML/JSON) and writes its own files, so a slow step costs only its own
# results. The step limits add up to 540 s (each step may take 15 s more to
# stop after its limit): the script ends within about 10 minutes. The
# training step's compiled providers (cold inductor compiles, about a minute
# each) have a step of their own, which may stop at its limit: the providers
# it reached are kept, beside an eager row of the same run for the ratios.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
: >"$out/summary.txt"

# step NAME LIMIT_S COMMAND...: run it, log to OUT/NAME.log, record status and time.
# A step named in $partial_ok may stop at its limit: what it finished is its
# result ("stopped at limit"), not a failure of the check.
partial_ok=""
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout -s INT -k 15 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="failed (exit $rc)"
  if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then  # 137: still running 15 s after SIGINT
    status="timed out after ${limit} s"
    [[ " $partial_ok " == *" $name "* ]] && status="stopped at limit ${limit} s"
  fi
  printf '%-17s %-26s %4d s  %s\n' "$name" "$status" $((SECONDS - start)) \
    "$(grep -E '[0-9]+ (passed|failed|error|tests? collected)' "$out/$name.log" | tail -1)" >>"$out/summary.txt"
  tail -3 "$out/$name.log"
  return $rc
}

python - "$out/env.json" "$dry" <<'EOF'
import datetime, json, platform, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF

# The Triton and CUDA test modules run whole (their tensors follow the kernels'
# device); the rest of the suite contributes its gpu-marked tests.
device_tests=(tests/test_triton_forward.py tests/test_triton_backward.py tests/test_triton_op.py
              tests/test_cuda_kernels.py tests/test_gpu_paths.py)
ignore=()
for f in "${device_tests[@]}"; do ignore+=(--ignore "$f"); done

if [ $dry -eq 1 ]; then
  # No CUDA build or card: the installed extension, Triton in the interpreter,
  # tests collected (their CPU runs are the main test suite's job) and the
  # benchmarks run at tiny sizes.
  export TRITON_INTERPRET=1 FUSED_PREACT_BENCH_DRY=1
  step extension 60 python -c "import fused_preact._extension as e; e.load(); print('extension loads')"
  step device_tests 120 python -m pytest "${device_tests[@]}" --collect-only -q -p no:cacheprovider
  step gpu_marked 120 python -m pytest tests -m gpu "${ignore[@]}" -q -p no:cacheprovider \
    --junitxml="$out/gpu_marked.xml"
  select="not compile"  # inductor compiles take minutes on the CPU and are the GPU run's to measure
  suites="unit:60 train_step:90 memory:60 op:60 train_compile:30"
  compile_depth=11  # the dry run's only depth: its train_compile step runs the eager row alone
else
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
  export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16}
  step build 120 python setup.py build_ext --inplace || { cat "$out/summary.txt"; exit 1; }
  # One Triton config per kernel: correctness needs no tuning, and it compiles little.
  export FUSED_PREACT_TRITON_AUTOTUNE=0
  step device_tests 120 python -m pytest "${device_tests[@]}" -q -p no:cacheprovider \
    --junitxml="$out/device_tests.xml"
  step gpu_marked 30 python -m pytest tests -m gpu "${ignore[@]}" -q -p no:cacheprovider \
    --junitxml="$out/gpu_marked.xml"
  unset FUSED_PREACT_TRITON_AUTOTUNE  # the benchmarks measure tuned kernels
  # Every suite but the launch counts (a CPU count), the whole training step replayed from a CUDA graph
  # (eager-graphed, fused-graphed) included; the compiled providers of the
  # training step in a step of their own (train_compile), run last.
  select=""
  suites="unit:35 train_step:70 memory:40 op:45 train_compile:60"
  compile_depth=110  # providers.sizes_for("cuda").max_compile_depth
  partial_ok="bench_train_compile"
fi

jsons=()
for suite in $suites; do
  name=${suite%%:*}
  file=$name filter=$select
  if [ "$name" = train_step ]; then
    filter="not compile${select:+ and ($select)}"
  elif [ "$name" = train_compile ]; then
    file=train_step filter="(compile or ($compile_depth-eager and not graphed))${select:+ and ($select)}"
  fi
  step "bench_$name" "${suite##*:}" python -m pytest "benchmarks/test_bench_$file.py" --benchmark-only -q \
    -p no:cacheprovider ${filter:+-k "$filter"} --benchmark-json="$out/gpu_$name.json"
  [ -s "$out/gpu_$name.json" ] && jsons+=("$out/gpu_$name.json")
done
if [ ${#jsons[@]} -gt 0 ]; then
  step report 20 python benchmarks/report.py "${jsons[@]}" --out-dir "$out" --name gpu
fi

echo "== summary ($out)"
cat "$out/summary.txt"
[ -f "$out/gpu.md" ] && head -40 "$out/gpu.md"
! grep -qE 'failed|timed out' "$out/summary.txt"
