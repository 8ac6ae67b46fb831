"""Training-step times of a few providers, measured round-robin: one step of
each provider per round, so that a shared machine's drift (other jobs, clock
changes) falls on all of them alike. The pytest-benchmark suites time one
provider after another, and on a shared CPU two providers minutes apart can
differ by 20% for no reason of their own; use this for a close comparison.

    python benchmarks/interleaved.py --depth 110 --batch 4 --rounds 15 checkpoint fused-unit-native

Prints each provider's median and min step time (forward, backward, SGD step
as in test_bench_train_step.py) and its ratio to the first provider's median.
"""
import argparse
import statistics
import time

import torch

from conftest import DEVICE
from providers import build_model, graphed_providers, is_compiled, provider_step, training_batch


def step_function(provider: str, depth: int, batch: int):
    model, forward = build_model(provider, depth, DEVICE)
    model.train()
    return provider_step(provider, model, forward, *training_batch(batch, DEVICE))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("providers", nargs="+", help="model providers (providers.py); the first is the baseline")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider (compiles, caches)")
    args = parser.parse_args(argv)
    if DEVICE.type != "cuda" and any(p in graphed_providers() for p in args.providers):
        parser.error(f"the graphed providers ({', '.join(graphed_providers())}) capture CUDA graphs: they need a GPU")
    if sum(is_compiled(p) for p in args.providers) > 1:
        # Models of one structure compiled side by side share Dynamo's graph,
        # so a second budget would run the first one's partition.
        parser.error("at most one compiled provider per run")
    steps = {p: step_function(p, args.depth, args.batch) for p in args.providers}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {p: [] for p in args.providers}
    for _ in range(args.rounds):
        for p, step in steps.items():
            start = time.perf_counter()
            step()
            times[p].append(time.perf_counter() - start)
    base = statistics.median(times[args.providers[0]])
    print(f"ResNet-{args.depth}, batch {args.batch}, {args.rounds} interleaved rounds, {DEVICE} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'provider':28s} {'median ms':>10s} {'min ms':>8s} {'x ' + args.providers[0]:>16s}")
    for p in args.providers:
        median = statistics.median(times[p])
        print(f"{p:28s} {median * 1e3:10.1f} {min(times[p]) * 1e3:8.1f} {median / base:16.3f}")


if __name__ == "__main__":
    main()
