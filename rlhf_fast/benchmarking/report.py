"""The outputs of `rlhf-fast bench`: a table on stdout, a JSON record and a PNG chart."""

from __future__ import annotations

from pathlib import Path

from . import harness
from .harness import fmt, format_table

COLUMNS = {
    "ppo": ["preset", "impl", "status", "samples_per_s", "experience_samples_per_s", "train_tokens_per_s", "generate_s",
            "score_s", "advantages_s", "train_s", "generate_fraction", "first_iteration_s"],
    "ppo memory / GPU": ["preset", "impl", "experience_peak_alloc_gib", "experience_peak_reserved_gib",
                         "train_peak_alloc_gib", "train_peak_reserved_gib", "experience_gpu_util_mean",
                         "train_gpu_util_mean", "iteration_gpu_util_mean"],
    "baseline": ["preset", "impl", "status", "samples_per_s", "generate_s", "score_s", "advantages_s", "train_s",
                 "generate_fraction", "iteration_peak_alloc_gib", "iteration_peak_reserved_gib",
                 "iteration_gpu_util_mean"],
    "generation": ["preset", "impl", "status", "tokens_per_s", "x_vs_ours_eager", "first_call_s", "peak_alloc_gib",
                   "peak_reserved_gib"],
}


def format_report(record: dict) -> str:
    env, cfg, lengths = record["environment"], record["config"], record["prompt_lengths"]
    out = [
        f"# rlhf-fast bench: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}",
        f"# {cfg['batch_size']} prompts x {cfg['prompt_len']} tokens "
        f"(lengths: {lengths['source']}, mean {lengths['mean']:.1f}) + {cfg['new_tokens']} new tokens, "
        f"{cfg['dtype']}, "
        f"{cfg['iters']} timed iteration(s) after {cfg['warmup']} warm-up",
    ]
    if record["memory_cap"]:
        out.append(
            f"# memory capped at {record['memory_cap']['max_vram_gb']:g} GiB "
            f"(fraction {record['memory_cap']['memory_fraction']:.3f} of the card)"
        )
    if not record["gpu_monitor"]["available"]:
        out.append(f"# GPU utilisation: not sampled ({record['gpu_monitor']['reason']})")
    cache, cold = record["compile_cache"], record["cold_start"]
    if cache["dir"]:
        loaded = {True: "loaded", False: "not loaded", None: "loaded: not known"}[cache["loaded"]]
        out.append(f"# compile cache {cache['dir']}: {loaded}; compile_cache.bin {fmt(cache['bytes'])} bytes")
    if cold:
        out.append(f"# cold start ({cold['impl']}): {fmt(cold['seconds'])} s from the model build to the end of the "
                   f"first iteration ({fmt(cold['from_process_start_s'])} s from process start)")
    if not record.get("complete", True):
        out.append("# INCOMPLETE: the run ended before its last row")
    for section, columns in COLUMNS.items():
        rows = [
            r
            for r in record["rows"]
            if r["section"] == section.split()[0] and r["status"] == "ok" or r["section"] == section
        ]
        if rows:
            out += ["", f"== {section}", format_table(rows, columns)]
    if record["targets"]:
        out += ["", "== targets (on CUDA only; the fastest of our PPO rows; cold start: the first compiled one)"]
        for preset, ts in record["targets"].items():
            for name, t in ts.items():
                verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
                out.append(
                    f"{preset:<12} {name:<24} {fmt(t['value']):>8}  target {t['target']:<7} {verdict}"
                )
    return "\n".join(out)


def record_stem(record: dict) -> str:
    """e2e-<presets>-<device>-<UTC time>."""
    return harness.record_stem(f"e2e-{'+'.join(record['config']['presets'])}", record["environment"])


def write_json(record: dict, out_dir: Path) -> Path:
    return harness.write_json(record, Path(out_dir) / f"{record_stem(record)}.json")


def write_chart(record: dict, path: Path) -> Path:
    """Left: PPO iteration time split into phases, ours per backend vs the seed-style baseline.
    Right: generation tokens/s per implementation. One row of plots per preset."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in record["rows"]))
    fig, axes = plt.subplots(len(presets), 2, figsize=(12, 3.2 * len(presets)), squeeze=False)
    phases = ["generate_s", "score_s", "advantages_s", "train_s"]
    for (ax_it, ax_gen), preset in zip(axes, presets):
        rows = [r for r in record["rows"] if r["preset"] == preset and r.get("seconds")]
        iters = [r for r in rows if r["section"] in ("ppo", "baseline")]
        left = [0.0] * len(iters)
        for phase in phases:
            widths = [r[phase] for r in iters]
            ax_it.barh([r["impl"] for r in iters], widths, left=left, label=phase.removesuffix("_s"))
            left = [a + b for a, b in zip(left, widths)]
        ax_it.set_xlabel("seconds per PPO iteration")
        ax_it.set_title(f"{preset}: PPO iteration ({record['config']['batch_size']} prompts)")
        ax_it.legend(fontsize="x-small", ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        gens = [r for r in rows if r["section"] == "generation"]
        ax_gen.barh([r["impl"] for r in gens], [r["tokens_per_s"] for r in gens], color="tab:green")
        ax_gen.set_xlabel("generated tokens / s")
        ax_gen.set_title(f"{preset}: generation")
    env = record["environment"]
    fig.suptitle(f"{env['device']} | torch {env['torch']} | commit {env['commit']}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
