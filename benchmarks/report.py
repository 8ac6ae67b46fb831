"""Turn a pytest-benchmark JSON of this suite into a markdown report, a plot of
memory against depth, and (optionally) the README's headline table and the
performance section of docs/benchmarks.md.
The tables: the training step (time and memory per provider against eager),
memory against depth, host work per step (launch counts), one unit, one layer,
converted networks, the Wide ResNet and DenseNet-BC.

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...] --out-dir benchmarks/results \
        [--readme README.md] [--details docs/benchmarks.md]
"""
import argparse
import json
import re
from pathlib import Path

MiB = 2**20
# Marker pairs of the generated sections: the README's headline table, the
# benchmarks page's full performance section.
HEADLINE = ("<!-- headline:start -->", "<!-- headline:end -->")
DETAILS = ("<!-- performance:start -->", "<!-- performance:end -->")


def load(paths):
    """(metadata of the first file, rows of all files); rows without a record() are skipped, and a
    (group, provider) measured in several files keeps its first row (gpu_check.sh's compile step
    re-measures eager beside the compiled providers, for their ratios)."""
    meta, rows, seen = None, [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = meta or data["fused_preact"]
        for r in data["benchmarks"]:
            info = r["extra_info"]
            if "group" not in info or (info["group"], info["provider"]) in seen:
                continue
            seen.add((info["group"], info["provider"]))
            rows.append(dict(info, name=r["name"], median_s=r["stats"]["median"], min_s=r["stats"]["min"],
                             max_s=r["stats"]["max"]))
    return meta, rows


def _ratio(row, key):
    return f"{row[key]:.3f}" if key in row else "n/a"


def group_table(rows, kind):
    """One markdown table per group of `kind` ('op', 'unit', 'train', 'convert', 'nets' or 'memory')."""
    out = []
    groups = sorted({r["group"] for r in rows if r["group"].split("|")[0] == kind},
                    key=lambda g: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)])
    for group in groups:
        members = [r for r in rows if r["group"] == group]
        label = "saved for backward" if members[0]["memory_kind"] == "saved" else "peak above weights"
        out += [f"**{group.split('|', 1)[1]}**", ""]
        if kind == "memory":  # one untimed-quality round: memory figures only
            out += [f"| provider | MiB/image ({label}) | × eager memory |", "|---|---|---|"]
            for r in sorted(members, key=lambda r: r["memory_bytes_per_image"]):
                out.append(f"| {r['provider']} | {r['memory_bytes_per_image'] / MiB:.3f} | "
                           f"{_ratio(r, 'memory_ratio_to_eager')} |")
        else:
            # Fraction of the card's DRAM bandwidth that the least possible
            # traffic (ideal_bytes) would use at the measured time.
            bandwidth = any("bandwidth_fraction" in r for r in members)
            out += [f"| provider | median ms | spread ms (min–max) | images/s | MiB/image ({label}) | × eager time "
                    f"| × eager memory |" + (" DRAM bandwidth |" if bandwidth else ""),
                    "|---|---|---|---|---|---|---|" + ("---|" if bandwidth else "")]
            for r in sorted(members, key=lambda r: r.get("time_ratio_to_eager", 0)):
                out.append(f"| {r['provider']} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}–"
                           f"{r['max_s'] * 1e3:.2f} | {r['images_per_s']:.0f} | "
                           f"{r['memory_bytes_per_image'] / MiB:.3f} | "
                           f"{_ratio(r, 'time_ratio_to_eager')} | {_ratio(r, 'memory_ratio_to_eager')} |"
                           + (f" {r['bandwidth_fraction']:.0%} |" if "bandwidth_fraction" in r else
                              (" n/a |" if bandwidth else "")))
        extra = [r for r in members if "largest_batch_on_card" in r]
        if extra:
            out.append("")
            out.append("Largest batch on the card (estimate): "
                       + ", ".join(f"{r['provider']} {r['largest_batch_on_card']}" for r in extra))
        out.append("")
    return out


# What each provider of the model suites is (see benchmarks/providers.py).
PROVIDERS = [
    "eager: the plain torch.nn model; checkpoint: torch.utils.checkpoint per unit of it",
    "compile: torch.compile (inductor) of the plain model, activation memory budget 1.0 (the default); "
    "compile-budget0.5 / compile-budget0.1: with `torch._functorch.config.activation_memory_budget` 0.5 / 0.1",
    "fused+compile / fused-segment+compile: torch.compile of the fused model in `bn_relu` / `segment` mode",
    "fused-MODE-BACKEND: fused_preact in recompute mode MODE on backend BACKEND",
    "eager-graphed / fused-graphed (CUDA only): the whole step of the plain / fused `bn_relu` model replayed "
    "from a CUDA graph",
]


def provider_legend(rows, kinds=("train", "memory")):
    """The legend of the providers, where any model-suite rows are present."""
    if not any(r["group"].split("|")[0] in kinds for r in rows):
        return []
    return ["Providers:", ""] + [f"- {line}" for line in PROVIDERS] + [""]


def _launch_order(row):
    """eager first, then per backend the recompute modes from least to most recomputation."""
    if row["provider"] == "eager":
        return (0, "", 0)
    _, mode, backend = row["provider"].split("-")
    modes = ("bn_relu", "unit", "segment")
    return (1, backend, modes.index(mode) if mode in modes else len(modes))


def launch_table(rows):
    """One markdown table per group of the launch suite: ATen ops and Triton
    launches per forward+backward, the SGD step's, and host synchronisations
    (nothing without launch rows)."""
    groups = sorted({r["group"] for r in rows if r["group"].startswith("launches|")},
                    key=lambda g: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)])
    if not groups:
        return []
    out = ["Kernel-launching ATen ops and Triton launches dispatched per step, counted on the CPU by "
           "`fused_preact.dispatch_count.DispatchCounter` (Triton in the interpreter); host syncs: any op "
           "that makes the host wait for the device.", ""]
    for group in groups:
        members = sorted((r for r in rows if r["group"] == group), key=_launch_order)
        out += [f"**{group.split('|', 1)[1]}**", "",
                "| provider | ATen ops | Triton launches | forward+backward | × eager | SGD step (foreach) "
                "| whole step | × eager | host syncs |", "|---|---|---|---|---|---|---|---|---|"]
        for r in members:
            out.append(f"| {r['provider']} | {r['aten_ops']:,} | {r['triton_launches']:,} | {r['fwd_bwd_ops']:,} | "
                       f"{_ratio(r, 'fwd_bwd_ops_ratio_to_eager')} | {r['sgd_ops']:,} | {r['step_ops']:,} | "
                       f"{_ratio(r, 'step_ops_ratio_to_eager')} | {'yes' if r['syncs'] else 'none'} |")
        out.append("")
    return out


def plot_memory(rows, meta, path):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = [r for r in rows if r["group"].startswith("memory|")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Providers that keep the same tensors draw the same line: vary the marks so each stays visible.
    for i, provider in enumerate(sorted({r["provider"] for r in mem})):
        pts = sorted((r["depth"], r["memory_bytes_per_image"] / MiB) for r in mem if r["provider"] == provider)
        ax.plot(*zip(*pts), marker="os^vDx+*"[i % 8], markersize=9 - i % 4 * 2, label=provider,
                linestyle="--" if provider.endswith("-reference") else "-", alpha=0.85)
    kind = "saved for backward" if mem and mem[0]["memory_kind"] == "saved" else "peak above weights"
    ax.set(xscale="log", yscale="log", xlabel="depth", ylabel=f"MiB per image ({kind})",
           title=f"PreActResNet memory vs depth — {meta['device']}, {meta['date'][:10]}")
    ax.set_xticks(sorted({r["depth"] for r in mem}), labels=[str(d) for d in sorted({r["depth"] for r in mem})])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(meta, rows, source):
    head = [f"Source: `{source}` — {meta['device']} ({meta['cpu_threads']} CPU threads), torch {meta['torch']}, "
            f"triton {meta['triton']}, {meta['date']}.", ""]
    sections = [("Training step", group_table(rows, "train")), ("Memory against depth", group_table(rows, "memory")),
                ("Host work per step", launch_table(rows)),
                ("One pre-activation bottleneck unit (forward + backward)", group_table(rows, "unit")),
                ("One BN→ReLU→conv layer", group_table(rows, "op")),
                ("Converted networks (fused_preact.convert)", group_table(rows, "convert")),
                ("Wide ResNet and DenseNet-BC", group_table(rows, "nets"))]
    return "\n".join(head + provider_legend(rows) + [line for title, table in sections if table
                                                     for line in [f"### {title}", "", *table]])


def headline_table(rows):
    """One table for the README: each provider's training step against eager
    (time and saved memory) at the depth that compares the most providers
    (the deeper on a tie), beside its saved bytes at the deepest memory point."""
    train = [r for r in rows if r["group"].startswith("train|")]
    memory = [r for r in rows if r["group"].startswith("memory|")]
    if not train:
        return []
    groups = {r["group"] for r in train}
    step_group = max(groups, key=lambda g: (sum(r["group"] == g for r in train), _depth_of(train, g)))
    deepest = max((r["depth"] for r in memory), default=None)
    at_depth = {r["provider"]: r for r in memory if r["depth"] == deepest}
    step = sorted((r for r in train if r["group"] == step_group), key=lambda r: r.get("time_ratio_to_eager", 0))
    name = step_group.split("|", 1)[1]
    out = [f"| provider | {name}: × eager step time | {name}: × eager memory |"
           + (f" ResNet-{deepest}: MiB/image saved (× eager) |" if deepest else ""),
           "|---|---|---|" + ("---|" if deepest else "")]
    for r in step:
        deep = at_depth.get(r["provider"])
        cell = (f" {deep['memory_bytes_per_image'] / MiB:.2f} ({_ratio(deep, 'memory_ratio_to_eager')}) |" if deep
                else " |")
        out.append(f"| {r['provider']} | {_ratio(r, 'time_ratio_to_eager')} | {_ratio(r, 'memory_ratio_to_eager')} |"
                   + (cell if deepest else ""))
    return out


def _depth_of(rows, group):
    return next(r.get("depth", 0) for r in rows if r["group"] == group)


def headline(meta, rows, source):
    return "\n".join([f"Generated by `benchmarks/report.py` from `{source}` ({meta['device']}, {meta['date'][:10]}, "
                      f"torch {meta['torch']}); all figures in [docs/benchmarks.md](docs/benchmarks.md).", ""]
                     + headline_table(rows))


def details(meta, rows, source):
    launches = launch_table(rows)
    return "\n".join([f"Generated by `benchmarks/report.py` from `{source}` ({meta['device']}, {meta['date'][:10]}, "
                      f"torch {meta['torch']}).", ""] + provider_legend(rows) + ["#### Training step", ""]
                     + group_table(rows, "train") + ["#### Memory against depth", ""] + group_table(rows, "memory")
                     + (["#### Host work per step", ""] + launches if launches else []))


def fill_section(path, markers, body):
    """Replace what lies between `markers` in the file at `path` with `body`."""
    text = Path(path).read_text()
    start_mark, end_mark = markers
    if start_mark not in text or end_mark not in text:
        raise SystemExit(f"{path} has no {start_mark} ... {end_mark} section")
    start, end = text.index(start_mark) + len(start_mark), text.index(end_mark)
    Path(path).write_text(text[:start] + "\n" + body + "\n" + text[end:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files of one run")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", help="stem of the report files (default: the first JSON's)")
    p.add_argument("--readme", help="a file with a headline section (README.md) to fill")
    p.add_argument("--details", help="a file with a performance section (docs/benchmarks.md) to fill")
    args = p.parse_args()
    meta, rows = load(args.json)
    out, stem = Path(args.out_dir), args.name or Path(args.json[0]).stem
    source = ", ".join(args.json)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(report(meta, rows, source) + "\n")
    if any(r["group"].startswith("memory|") for r in rows):
        plot_memory(rows, meta, out / f"{stem}_memory_vs_depth.png")
    if args.readme:
        fill_section(args.readme, HEADLINE, headline(meta, rows, source))
    if args.details:
        fill_section(args.details, DETAILS, details(meta, rows, source))


if __name__ == "__main__":
    main()
