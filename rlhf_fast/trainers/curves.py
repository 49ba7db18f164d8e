"""<run dir>/curves.png: a stage's main scalars over its steps, drawn at the end of every `train()`.

The curves are read back from the run's metrics.jsonl, so a resumed run draws its whole history (the
records a resume re-ran were dropped from the file, see `MetricsLogger.truncate`). One panel per
(title, keys) pair whose keys have data; a key is drawn as one line over the steps it was logged at.
matplotlib (Agg backend, no display) is imported only here, when drawing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

Panels = tuple[tuple[str, tuple[str, ...]], ...]

LOSS: Panels = (("loss", ("train/loss", "eval/loss")),)
# metrics.jsonl keys: SFT/RM/DPO log `train/<metric>` per step and `eval/<metric>` per evaluation; the RL loop
# logs its iteration metrics under their own names (`score`, `kl`, `time/generate`, `train/loss`, ...)
STAGE_PANELS: dict[str, Panels] = {
    "sft": LOSS,
    "rm": LOSS + (("pair accuracy", ("train/accuracy", "eval/accuracy")),
                  ("reward margin (chosen - rejected)", ("train/margin", "eval/margin"))),
    "dpo": LOSS + (("reward accuracy", ("train/accuracy", "eval/accuracy")),
                   ("reward margin (chosen - rejected)", ("train/rewards/margins", "eval/rewards/margins"))),
}
RL_PANELS: Panels = (
    ("reward", ("score", "eval/reward", "eval/greedy_reward")),
    ("KL to the reference (nats / sequence)", ("kl", "eval/kl")),
    ("loss", ("train/loss", "train/policy_loss", "train/value_loss")),
    ("gold reward (held-out; a measure, not trained on)", ("eval/gold", "eval/greedy_gold")),
)


def read_metrics(path) -> list[dict]:
    """The step records of a metrics.jsonl (events and unreadable lines skipped); [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order; a step logged twice keeps its last value."""
    points = {r["step"]: float(r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(records: list[dict], path, panels: Panels, *, title: str | None = None,
                xlabel: str = "step") -> list[str]:
    """Draw each panel of `panels` that has data into the PNG `path`; returns the titles drawn. Nothing to draw
    (e.g. --log-every 0 and no evaluation): no file, []."""
    drawn = [(name, [(key, *series(records, key)) for key in keys]) for name, keys in panels]
    drawn = [(name, [s for s in lines if s[1] and not all(map(math.isnan, s[2]))]) for name, lines in drawn]
    drawn = [(name, lines) for name, lines in drawn if lines]
    if not drawn:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], drawn):
        for key, steps, values in lines:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        ax.set(title=name, xlabel=xlabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [name for name, _ in drawn]


def write_curves(run_dir, panels: Panels, *, title: str | None = None, xlabel: str = "step",
                 path=None) -> Path | None:
    """<run_dir>/curves.png (or `path`) from <run_dir>/metrics.jsonl; None when there was nothing to draw."""
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / "curves.png"
    if not plot_curves(read_metrics(run_dir / "metrics.jsonl"), path, panels, title=title, xlabel=xlabel):
        return None
    return path


def plot_gold_vs_kl(points: list[dict], path, *, title: str | None = None) -> Path | None:
    """The over-optimisation picture of Gao et al. (2022): held-out gold reward against KL to the reference,
    one point per evaluation ({"iteration", "kl", "gold", "greedy_gold"}), each labelled by its iteration.
    None (no file) without points."""
    points = [p for p in points if isinstance(p.get("kl"), (int, float)) and "gold" in p]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    kl = [p["kl"] for p in points]
    for key, label in (("gold", "sampled"), ("greedy_gold", "greedy")):
        if all(key in p for p in points):
            ax.plot(kl, [p[key] for p in points], marker="o", label=label)
    for p in points:
        ax.annotate(str(p["iteration"]), (p["kl"], p["gold"]), textcoords="offset points", xytext=(3, 3),
                    fontsize="x-small")
    ax.set(xlabel="KL to the reference (nats / sequence)", ylabel="gold reward (held-out)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
