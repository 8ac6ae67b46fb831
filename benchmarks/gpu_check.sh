#!/usr/bin/env bash
# The one GPU check, made for a cold 15-minute lease on a fresh CUDA machine:
# correctness first, then the benchmarks, each step under its own time limit,
# raw results in OUT_DIR (env.json with card, versions and date; one log per
# step; junit XML; each step's Triton compiles; pytest-benchmark JSON; the
# markdown report and plot; summary.txt).
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # anywhere: every step at tiny sizes on the CPU
#
# Order, for a cold machine: the Triton kernels of every paper layer (and of
# DenseNet-BC's and WRN-28-10's) are compiled first, in 12 processes, into the Triton cache the later steps read
# (fused_preact.aot --cache: a step that would compile them one at a time
# finds them compiled), while the CUDA extension builds in the background (a
# failed or slow build costs only the steps that need it). Then correctness:
# Triton with pinned configs (FUSED_PREACT_TRITON_AUTOTUNE=0, one per kernel
# and shape), Triton autotuned at the paper's shapes in fp32, TF32, fp16 and
# bf16, the native kernels, CUDA graphs, inductor; the benchmarks last. The
# Triton test modules' small odd shapes are the interpreter's (CI), not this
# lease's: each would be a cold compile of its own.
#
# Limits, from the cold-compile cost measured ahead of time
# (benchmarks/results/triton_sm90_triton36.md, triton 3.6 on a 2-core CPU):
# about 2 s per conv kernel, 1187 kernels for the bottleneck nets in the four
# dtype modes, some 1500 with the basic net's: over 12 processes some 250 s
# at that CPU's speed, hence warm's 200 s on a faster host (what it does not
# reach is compiled when first launched, as without it; it keeps what it
# compiled when stopped). Warm, an autotuned paper shape costs its benchmark
# runs only (~0.15 s a config, some 15 configs a shape and mode): 36 tests,
# triton_tuned's 90 s. The benchmarks get what is left and keep the providers
# they reach. Every step records its compiles (OUT/NAME.compiles: kernel and
# seconds; a warm hit takes milliseconds), and warm writes the host's own
# compile table (triton_warm.md), so the next run sets these limits from the
# GPU machine's numbers. The limits add up to 600 s, more than a run has:
# one deadline, GPU_CHECK_SECONDS (default 540) after the start, clips each
# step's limit so that the run ends within the device's 600 s command limit,
# a step's 15 s to stop after SIGINT included, and keeps 15 s for the report;
# a step it leaves under 5 s is not run ("not reached" for a benchmark step,
# which is no failure). The dry run has no deadline unless given one. Its
# files are written as each step ends, so a cut run still returns them.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
start_all=$SECONDS
budget=${GPU_CHECK_SECONDS:-$([ $dry -eq 1 ] && echo 0 || echo 540)}  # 0: no deadline
[[ $budget =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_SECONDS must be a whole number of seconds, got '$budget'"; exit 2; }
printf '| step | result | seconds | tests | Triton compiles |\n|---|---|---|---|---|\n' >"$out/summary.txt"

# row NAME STATUS SECONDS: one line of the summary table.
row() {
  local tests="" compiles=""
  [ -f "$out/$1.log" ] && tests=$(grep -E '[0-9]+ (passed|failed|error|skipped|tests? collected)' "$out/$1.log" \
                                  | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  [ -s "$out/$1.compiles" ] && compiles=$(awk '{n++; s+=$2} END {printf "%d, %.0f s", n, s}' "$out/$1.compiles")
  printf '| %s | %s | %d | %s | %s |\n' "$1" "$2" "$3" "$tests" "$compiles" >>"$out/summary.txt"
}

# status RC NAME LIMIT: the step's result in words.
status() {
  case $1 in
    0) echo ok ;;
    124|130|137) [[ " $partial_ok " == *" $2 "* ]] && echo "stopped at limit $3 s" || echo "timed out after $3 s" ;;
    *) echo "failed (exit $1)" ;;
  esac
}

# step NAME LIMIT COMMAND...: run it (SIGINT at the limit, so pytest still
# writes its XML/JSON), log to OUT/NAME.log, its Triton compiles to
# OUT/NAME.compiles, and add its row. A step named in $partial_ok may stop at
# its limit: what it finished is its result, not a failure of the check.
partial_ok=""
step() {
  local name=$1 limit start=$SECONDS rc
  limit=$(clipped "$1" "$2") || { over "$name"; return 124; }
  shift 2
  echo "== $name (limit ${limit} s)"
  FUSED_PREACT_COMPILE_LOG="$out/$name.compiles" timeout -s INT -k 15 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  row "$name" "$(status $rc "$name" "$limit")" $((SECONDS - start))
  tail -3 "$out/$name.log"
  return $rc
}

# skip NAME WHY: a step that could not run, in the table.
skip() { echo "== $1: not run ($2)"; row "$1" "not run: $2" 0; }

# clipped NAME LIMIT: LIMIT, cut to what the deadline leaves once the step's
# 15 s to stop and (but for the report) the report's 15 s are kept; fails
# where that is under 5 s.
clipped() {
  local keep=15 left
  [ "$budget" -gt 0 ] || { echo "$2"; return 0; }
  [ "$1" = report ] && keep=0
  left=$((start_all + budget - SECONDS - 15 - keep))
  [ "$left" -ge 5 ] || return 1
  echo $((left < $2 ? left : $2))
}

# over NAME: a step the deadline left no time for, in the table.
over() {
  if [[ " $partial_ok " == *" $1 "* ]]; then
    echo "== $1: not reached (time budget spent)"; row "$1" "not reached: time budget spent" 0
  else
    skip "$1" "time budget spent"
  fi
}

python - "$out/env.json" "$dry" <<'EOF'
import datetime, json, platform, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None}
try:
    import numpy, triton
    info["triton"], info["numpy"] = triton.__version__, numpy.__version__
except ImportError:
    info["triton"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF

# -p compile_log (benchmarks/compile_log.py): each step's Triton compiles, to OUT/NAME.compiles.
export PYTHONPATH=benchmarks${PYTHONPATH:+:$PYTHONPATH}
pytest=(python -m pytest -q -p no:cacheprovider -p compile_log)
# The gpu-marked Triton tests (paper shapes in every dtype, a step repeated
# bit for bit, autocast); CUDA graphs and inductor have steps of their own.
triton_gpu=(tests/test_triton_forward.py tests/test_triton_backward.py tests/test_triton_row_sums.py tests/test_triton_stats_epilogue.py tests/test_triton_backward_sums.py tests/test_gpu_paths.py -m gpu)
if [ $dry -eq 1 ]; then
  # No CUDA: the installed extension instead of a build, Triton in the
  # interpreter (nothing to compile ahead), the device steps' tests collected
  # (their CPU runs are the main suite's job), the benchmarks at tiny sizes.
  export TRITON_INTERPRET=1 FUSED_PREACT_BENCH_DRY=1
  build=(python -c "import fused_preact._extension as e; e.load(); print('extension loads')")
  warm=(python -c "from fused_preact import aot_layers as a; print(sum(len(f()) for f in a.NETS.values()), 'layers')")
  collect=(--collect-only)
  limits="warm:30 build:60 untuned:60 tuned:60 native:60 graphs:60 inductor:60"
  suites="unit:60 train_step:90 memory:60 op:60 train_compile:30 convert:180 wide_dense:120"
  select="not compile"  # inductor compiles take minutes on the CPU and are the GPU run's to measure
  compile_depth=11  # the dry run's only depth: its train_compile step runs the eager row alone
else
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
  export TORCH_CUDA_ARCH_LIST="$arch"
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
  # 4 of the 16 cores: the Triton kernels compile in 12 processes beside the build.
  build=(env MAX_JOBS=${MAX_JOBS:-4} python setup.py build_ext --inplace)
  case ${arch/./} in
    80|90) warm=(python -m fused_preact.aot --arch "${arch/./}" --nets bottleneck basic dense wide
                 --jobs 12 --cache "$TRITON_CACHE_DIR" --out "$out/triton_warm.md") ;;
    *) warm=(echo "no ahead-of-time compile for sm_${arch/./}: the kernels compile when first launched") ;;
  esac
  collect=()
  limits="warm:200 build:350 untuned:60 tuned:90 native:30 graphs:25 inductor:30"
  suites="unit:20 train_step:45 memory:20 op:20 train_compile:20 convert:15 wide_dense:15"
  select=""
  compile_depth=110  # providers.sizes_for("cuda").max_compile_depth
  # What these stop at their limit keeps: warm's compiled kernels, the benchmarks' finished providers.
  partial_ok="warm bench_unit bench_train_step bench_memory bench_op bench_train_compile bench_convert bench_wide_dense"
fi
limit() { local pair; for pair in $limits; do [ "${pair%%:*}" = "$1" ] && echo "${pair##*:}"; done; }

# The build, in the background; waited for before the native steps.
build_start=$SECONDS
echo "== build (background, limit $(limit build) s)"
timeout -k 15 "$(limit build)" "${build[@]}" >"$out/build.log" 2>&1 &
build_pid=$!

step warm "$(limit warm)" "${warm[@]}"
FUSED_PREACT_TRITON_AUTOTUNE=0 step triton_untuned "$(limit untuned)" "${pytest[@]}" "${collect[@]}" \
  "${triton_gpu[@]}" -k "not native and not graph and not inductor" --junitxml="$out/triton_untuned.xml"
step triton_tuned "$(limit tuned)" "${pytest[@]}" "${collect[@]}" tests/test_gpu_paths.py \
  -k "paper_shapes and triton" --junitxml="$out/triton_tuned.xml"

wait "$build_pid"
build_rc=$?
row build "$(status $build_rc build "$(limit build)")" $((SECONDS - build_start))
tail -3 "$out/build.log"
if [ $build_rc -eq 0 ]; then
  step native_tests "$(limit native)" "${pytest[@]}" "${collect[@]}" tests/test_cuda_kernels.py tests/test_op.py \
    tests/test_gpu_paths.py -m gpu -k "not triton and not graph and not inductor" --junitxml="$out/native_tests.xml"
else
  skip native_tests "the build failed"
fi
# CUDA graphs and inductor of whichever backends are built.
backends=$([ $build_rc -eq 0 ] && echo "" || echo "and not native")
step cuda_graphs "$(limit graphs)" "${pytest[@]}" "${collect[@]}" tests/test_gpu_paths.py tests/test_train_graphs.py \
  tests/test_triton_forward.py -m gpu -k "graph $backends" --junitxml="$out/cuda_graphs.xml"
step inductor "$(limit inductor)" "${pytest[@]}" "${collect[@]}" tests/test_gpu_paths.py -m gpu \
  -k "inductor $backends" --junitxml="$out/inductor.xml"

jsons=()
for suite in $suites; do
  name=${suite%%:*}
  file=$name filter=$select
  if [ "$name" = train_step ]; then
    filter="not compile${select:+ and ($select)}"
  elif [ "$name" = train_compile ]; then
    file=train_step filter="(compile or ($compile_depth-eager and not graphed))${select:+ and ($select)}"
  fi
  step "bench_$name" "${suite##*:}" "${pytest[@]}" "benchmarks/test_bench_$file.py" --benchmark-only \
    ${filter:+-k "$filter"} --benchmark-json="$out/gpu_$name.json"
  [ -s "$out/gpu_$name.json" ] && jsons+=("$out/gpu_$name.json")
done
if [ ${#jsons[@]} -gt 0 ]; then
  step report 10 python benchmarks/report.py "${jsons[@]}" --out-dir "$out" --name gpu
fi

echo "== summary ($out, $((SECONDS - start_all)) s)"
cat "$out/summary.txt"
[ -f "$out/gpu.md" ] && head -40 "$out/gpu.md"
! grep -qE 'failed|timed out|not run' "$out/summary.txt"
