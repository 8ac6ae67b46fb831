"""The host-cost meter (fused_preact.host_cost): a Triton training step run
through triton's real autotuner and binder with every launch cut at the
compiled kernel, its launches and ATen ops checked against a hand count, so
that a launch added anywhere fails here. The meter needs triton's JIT, not
its interpreter: it runs in a subprocess with TRITON_INTERPRET=0."""
import json
import os
import subprocess
import sys

import pytest

# PreActResNet-11 (one bottleneck unit per stage, 9 BN-ReLU-convs), batch 2,
# 4x4 images, recompute="bn_relu", with the GPU's sizes:
# - statistics: one pass over the stem's output (unit 1's bn1); every other
#   BatchNorm's statistics come from the epilogue of the conv before it and
#   are merged in the next conv's loader at this size;
# - forward: one conv per layer (a stage's first unit runs its conv1 and
#   projection as one GEMM);
# - backward, per layer: wgrad per conv (9 + 3 projections, each a single
#   chunk at this size, so its partials need no sum), one dgrad (its own
#   last programs sum its BN partials, also a stride-2 dgrad's four phase
#   rows), one input-gradient pass.
TRITON_LAUNCHES = {"_partial_stats_kernel": 1, "_conv_fwd_kernel": 9, "_wgrad_kernel": 12, "_dgrad_kernel": 9,
                   "_input_grad_kernel": 9}
# The ATen ops are the net's unfused ends: the stem conv, the final
# BatchNorm + ReLU (with its num_batches_tracked += 1), pooling, the
# classifier and the loss, each forward and backward (the stem's backward
# computes its weight gradient only: the images need none).
ATEN_OPS = {"convolution": 1, "convolution_backward": 1, "native_batch_norm": 1, "native_batch_norm_backward": 1,
            "add_": 1, "relu": 1, "threshold_backward": 1, "mean": 1, "div": 1, "addmm": 1, "mm": 2, "sum": 1,
            "_log_softmax": 1, "_log_softmax_backward_data": 1, "nll_loss_forward": 1, "nll_loss_backward": 1,
            "ones_like": 1}

_METER = """
import collections, json, sys
from fused_preact import PreActResNet
from fused_preact.host_cost import main, measure

r = measure(lambda: PreActResNet(11, backend="triton", recompute="bn_relu"), 2, 4, "meta", repeats=1, cut=True)
main(["--depth", "11", "--batch", "2", "--size", "4", "--modes", "bn_relu", "--repeats", "1", "--out", sys.argv[1]])
paper = measure(lambda: PreActResNet(11, backend="triton", recompute="bn_relu"), 128, 32, "meta", repeats=0,
                cut=True)
fewest = {}
for l in paper["launches"]:
    fewest[l.kernel] = min(fewest.get(l.kernel, l.programs), l.programs)
reductions = [l for l in paper["launches"] if l.kernel in ("_merge_partials_kernel", "_sum_rows_kernel")]
print(json.dumps({"launches": collections.Counter(l.kernel for l in r["launches"]), "ops": r["ops"],
                  "grids": [l.grid for l in r["launches"]], "host_us": r["host_us"],
                  "paper_copies": paper["ops"]["cat"], "fewest_programs": fewest,
                  "paper_reductions": collections.Counter(l.kernel for l in reductions),
                  "paper_dx_with_sums": sum(dict(l.config)["SUMS"] for l in paper["launches"]
                                            if l.kernel == "_input_grad_kernel")}))
"""


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    table = tmp_path_factory.mktemp("host_cost") / "table.md"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _METER, str(table)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), table.read_text()


def test_triton_launches_match_the_hand_count(metered):
    result, _ = metered
    assert result["launches"] == TRITON_LAUNCHES


def test_aten_ops_match_the_hand_count(metered):
    result, _ = metered
    assert result["ops"] == ATEN_OPS


def test_each_launch_records_its_grid_and_the_step_its_host_time(metered):
    result, _ = metered
    assert len(result["grids"]) == sum(TRITON_LAUNCHES.values())
    assert all(len(g) == 3 and min(g) >= 1 for g in result["grids"])
    assert result["host_us"] > 0


def test_at_the_paper_batch_only_wide_gemms_copy_their_weights(metered):
    # ResNet-11 at batch 128, 32x32: a GEMM of over 4096 rows and over 64
    # outputs copies its weights (one cat), the others read them in place:
    # the fan-out of each stage's first layer (conv1 + projection: 80, 160,
    # 320 outputs) and conv3 of stages 2 and 3 (128, 256); stage 1's conv3
    # (64 outputs) and every conv1/conv2 of at most 64 do not.
    result, _ = metered
    assert result["paper_copies"] == 5


def test_at_the_paper_batch_no_reduction_takes_a_launch_of_its_own(metered):
    # ResNet-11 at batch 128, 32x32: every conv's epilogue merges the next
    # BatchNorm's statistics itself (its last programs), and the next conv
    # folds that one row in its loader; dgrad's last programs sum its BN
    # partials; the weight gradients' partials (thousands of rows, split-K)
    # are summed by programs of the dx launch. The only reduction launch is
    # the merge of the stem output's statistics pass (hundreds of partials),
    # and the dx launches carry programs beyond their elementwise ones.
    result, _ = metered
    assert result["paper_reductions"] == {"_merge_partials_kernel": 1}
    assert result["paper_dx_with_sums"] >= 5


def test_at_the_paper_batch_the_gemms_and_dx_fill_an_h100(metered):
    # 132 SMs: the convs, dgrad (64-row tiles, 16-wide channel tiles at the
    # 8x8 stage, where 128 and 32 would give 128 programs) at least 2
    # programs an SM, the elementwise dx pass at least 8.
    result, _ = metered
    fewest = result["fewest_programs"]
    assert fewest["_conv_fwd_kernel"] >= 2 * 132 and fewest["_dgrad_kernel"] >= 2 * 132, fewest
    assert fewest["_input_grad_kernel"] >= 8 * 132, fewest


def test_the_table_puts_eager_native_and_triton_side_by_side(metered):
    _, table = metered
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")}
    assert list(rows) == ["eager nn", "native bn_relu", "triton bn_relu"]
    aten, launches, total = (int(v) for v in rows["triton bn_relu"][:3])
    assert (aten, launches, total) == (sum(ATEN_OPS.values()), sum(TRITON_LAUNCHES.values()), aten + launches)
    assert rows["eager nn"][1] == "0" and rows["eager nn"][3] == "1.00"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="checks the interpreter's refusal")
def test_the_interpreter_is_refused_in_one_line():
    from fused_preact.host_cost import cut_launches

    with pytest.raises(RuntimeError, match="run it with TRITON_INTERPRET unset or 0"):
        with cut_launches():
            pass


# ----------------------------------------------------------------------------- occupancy

@pytest.mark.parametrize("arch, regs, shared, warps, expected", [
    # 128 registers x 32 threads = 4096 per warp: 16 warps, 2 programs of 8 warps
    (90, 128, 32768, 8, (2, "registers")),
    # 40 rounds up to 40: 1280 per warp, 51 warps, 12 programs of 4 warps
    (90, 40, 0, 4, (12, "registers")),
    # 37 rounds up to 40, as above
    (90, 37, 0, 4, (12, "registers")),
    # 100000 bytes + 1 KiB reserved: 2 per SM on sm_90 (228 KiB), 1 on sm_80 (164 KiB)
    (90, 32, 100000, 4, (2, "shared memory")),
    (80, 32, 100000, 4, (1, "shared memory")),
    # one warp of 16 registers: the 32-program cap
    (90, 16, 0, 1, (32, "CTA cap")),
    # 16 warps of 32 registers: 64 warps an SM
    (90, 32, 0, 16, (4, "warps")),
])
def test_resident_programs_per_sm(arch, regs, shared, warps, expected):
    from fused_preact.occupancy import ctas_per_sm

    assert ctas_per_sm(arch, regs, shared, warps) == expected


def test_the_occupancy_table_counts_waves_per_launch(monkeypatch):
    from fused_preact import occupancy
    from fused_preact.host_cost import Launch

    class Spec:  # a cut launch's specialisation: what resources() compiles
        def __init__(self, regs, shared):
            self.source, self.options = (regs, shared), {}

    monkeypatch.setattr(occupancy, "resources", lambda spec, arch: spec.source)
    small = Spec(40, 0)  # 12 programs an SM
    config = (("BLOCK_M", 64), ("num_stages", 3), ("num_warps", 4))
    launches = {"net": [Launch(("k", (100, 1, 1), config, small)), Launch(("k", (100, 1, 1), config, small)),
                        Launch(("k", (132, 12, 2), config, small))]}
    rows = occupancy.table(launches, 90)
    assert [(r["programs"], r["ctas_per_sm"], r["per_step"]["net"]) for r in rows] == [(100, 12, 2), (3168, 12, 1)]
    assert rows[0]["waves"] == pytest.approx(100 / (132 * 12)) and rows[1]["waves"] == pytest.approx(2.0)
    text = occupancy.markdown(rows, 90, 128, 32)
    assert ("net: 3 launches per step, 2 of them (67%) under one wave; 2 under 2 programs per SM (k 2).") in text
