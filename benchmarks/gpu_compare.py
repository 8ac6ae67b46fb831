"""Training-step memory and speed of fused_preact vs eager PyTorch on one GPU.

For each depth and provider: a full SGD training step at the paper's batch 128
on CIFAR-sized input; peak memory (torch.cuda.max_memory_allocated, total and
above the parameters + optimizer state), median step time from CUDA events,
images/s, all as ratios to eager measured in the same run. Writes raw JSON.

    python benchmarks/gpu_compare.py --out results.json [--depths 164 1001] [--batch 128]
"""
import argparse
import datetime
import json
import platform
import statistics

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import fused_preact
from fused_preact import PreActResNet


def _checkpointed_per_unit(model: PreActResNet):
    """torch.utils.checkpoint around each unit of the plain model, as users do it
    (note: its recompute updates BatchNorm running statistics a second time)."""

    def forward(x):
        x = model.conv1(x)
        for unit in model.units:
            x = torch.utils.checkpoint.checkpoint(unit, x, use_reentrant=False)
        x = F.relu(model.bn(x))
        return model.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    return forward


PROVIDERS = {
    # name: (model kwargs, wraps forward with per-unit torch.utils.checkpoint)
    "eager": (dict(fused=False, recompute="none"), False),
    "checkpoint": (dict(fused=False, recompute="none"), True),
    "plain_unit": (dict(fused=False, recompute="unit"), False),
    "bn_relu": (dict(fused=True, recompute="bn_relu", backend="native"), False),
    "unit": (dict(fused=True, recompute="unit", backend="native"), False),
    "segment": (dict(fused=True, recompute="segment", backend="native"), False),
}


def measure(depth, provider, batch, steps, warmup, channels_last):
    kwargs, checkpointed = PROVIDERS[provider]
    torch.manual_seed(0)
    model = PreActResNet(depth, **kwargs).cuda().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = _checkpointed_per_unit(model) if checkpointed else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, device="cuda", generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device="cuda", generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        return loss

    first_loss = float(step())  # also creates the optimizer state
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    del model, opt, forward
    torch.cuda.empty_cache()
    ms = statistics.median(times)
    return {"depth": depth, "provider": provider, "batch": batch, "channels_last": channels_last,
            "ms_per_step_median": ms, "ms_per_step_min": min(times), "ms_per_step_max": max(times),
            "images_per_s": batch / ms * 1e3, "peak_mib": peak / 2**20, "activation_peak_mib": (peak - baseline) / 2**20,
            "first_step_loss": first_loss}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--depths", type=int, nargs="+", default=[164, 1001])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()

    rows = []
    for depth in args.depths:
        for provider in args.providers:
            r = measure(depth, provider, args.batch, args.steps, args.warmup, args.channels_last)
            eager = next((e for e in rows if e["depth"] == depth and e["provider"] == "eager"), r)
            r["time_ratio_to_eager"] = r["ms_per_step_median"] / eager["ms_per_step_median"]
            r["speedup_vs_eager"] = eager["ms_per_step_median"] / r["ms_per_step_median"]
            r["peak_ratio_to_eager"] = r["peak_mib"] / eager["peak_mib"]
            r["activation_ratio_to_eager"] = r["activation_peak_mib"] / eager["activation_peak_mib"]
            rows.append(r)
            print(f"{depth:>5} {provider:>10}  {r['ms_per_step_median']:8.1f} ms  {r['images_per_s']:8.0f} img/s  "
                  f"x{r['speedup_vs_eager']:.2f} speed  peak {r['peak_mib']:8.0f} MiB (x{r['peak_ratio_to_eager']:.3f})"
                  f"  activations x{r['activation_ratio_to_eager']:.3f}  loss {r['first_step_loss']:.4f}", flush=True)

    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "card": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": triton_version, "python": platform.python_version(), "fused_preact": fused_preact.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tf32_conv": torch.backends.cudnn.allow_tf32, "args": vars(args), "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
