"""`rlhf-fast eval`: two or more policies on the same held-out prompts, judged side by side.

Each policy (an HF export, or a run directory holding `export/`) answers every prompt with `samples`
sampled responses (one seeded generator per policy, the same seed for all: common random numbers) and
one greedy response. Measured per policy: the reward model's mean score (sampled and greedy), the task's
gold reward (`gold.py`), the summed-k1 KL to the reference (default: the first policy) on the sampled
responses, response length, distinct-1/2 and repetition. Between policies, on the sampled and on the
greedy responses: the reward model's pairwise win-rate with a bootstrap 95% interval over prompts (and the
gold win-rate where there is a gold reward), and the alarms of `metrics.py` against the first policy.

Writes into output_dir: eval.json (everything), eval.md (the table), eval.png (bars) and samples.md (each
prompt with every policy's greedy and sampled responses next to each other, with their scores).
Every path is checked before anything is loaded or generated; a bad one is an `EvalInputError` (a ConfigError)
naming it, with the setting that gave it as `where`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_fast.config import option, resolve_device
from rlhf_fast.data import arithmetic_split, load_prompts, load_tokenizer, synthetic_prompts
from rlhf_fast.errors import ConfigError
from rlhf_fast.generation import release_kv_caches
from rlhf_fast.model import GPT
from rlhf_fast.rl import AdvantageConfig
from rlhf_fast.trainers.builders import tokenizer_signature
from rlhf_fast.trainers.demo import HELD_OUT_SEED_OFFSET
from rlhf_fast.trainers.experience import ExperienceMaker
from rlhf_fast.trainers.heldout import held_out_responses
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.reward_functions import Scorer, load_reward_model_scorer, score_completions

from .gold import GOLD_DESCRIPTIONS, TASKS, gold_reward
from .metrics import alarms, distinct_n, length_stats, repetition, win_rate

DEFAULT_MAX_NEW_TOKENS = {"arithmetic": 16}  # others: 48, the RL default (the synthetic answers are <= 48 bytes)
BUILT_IN_PROMPTS = ("synthetic", "arithmetic")  # tasks with a held-out draw of their own; the others need --prompts


class EvalInputError(ConfigError):
    """A path, export or setting `rlhf-fast eval` cannot use; `where` is the setting ("policies", ...)."""


@dataclass(frozen=True)
class EvalConfig:
    policies: tuple[str, ...] = option(help="policy exports or run directories (runs/demo/ppo); the first is the "
                                            "baseline of win-rates and alarms", metavar="DIR")
    names: tuple[str, ...] | None = option(None, "a name per policy (default: from the directory names)")
    reward_model: str | None = option(None, "an `rlhf-fast rm` export: scores and win-rates (default: none)",
                                      metavar="DIR")
    reference: str | None = option(None, "the KL reference (default: the first policy)", metavar="DIR")
    task: str | None = option(None, "held-out prompts and gold reward: synthetic (default), arithmetic, sentiment "
                                    "(with --prompts), none (default with --prompts)", choices=TASKS)
    prompts: str | None = option(None, "a .jsonl(.gz) file of {\"prompt\": ...} lines or HH records: its last "
                                       "--num-prompts prompts instead of the task's", metavar="FILE")
    skip_bad_examples: bool = option(False, "skip (and count in the log) --prompts lines that cannot be parsed, "
                                     "instead of failing")
    num_prompts: int = option(64, "held-out prompts")
    samples: int = option(4, "sampled responses per prompt, plus one greedy")
    max_new_tokens: int | None = option(None, "response tokens (default: 48; arithmetic 16)")
    temperature: float = option(1.0, "sampling temperature")
    seed: int = option(0, "sampling, bootstrap and the task's held-out draw (0: the demo's held-out prompts)")
    batch_size: int = option(32, "prompts per generation batch")
    device: str | None = option(None, "cpu, cuda, ... (default: cuda when available, else cpu)")
    output_dir: str = option("runs/eval", "eval.json, eval.md, eval.png, samples.md")

    def __post_init__(self):
        resolve_device(self.device)
        if not self.policies:
            raise EvalInputError("give at least one policy directory", "policies")
        if self.names is not None and len(self.names) != len(self.policies):
            raise EvalInputError(f"{len(self.names)} names for {len(self.policies)} policies", "names")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise EvalInputError(f"names must differ, got {list(self.names)}", "names")
        for key in ("num_prompts", "samples", "batch_size", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise EvalInputError(f"must be >= 1, got {value}", key)
        if not self.temperature > 0:
            raise EvalInputError(f"must be > 0, got {self.temperature}", "temperature")
        if self.task is not None and self.task not in TASKS:
            raise EvalInputError(f"must be one of {TASKS}, got {self.task!r}", "task")
        if self.prompts is None and self.task_name not in BUILT_IN_PROMPTS:
            raise EvalInputError(f"task {self.task_name!r} has no built-in prompts: give a prompt file", "prompts")

    @property
    def task_name(self) -> str:
        return self.task or ("none" if self.prompts else "synthetic")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(self.task_name, 48)


# --- inputs: exports, prompts ---------------------------------------------------------------------------


def resolve_export(path: str, key: str) -> Path:
    """The HF export directory `path` (the value of setting `key`) names: itself, or a run directory's export/;
    checked for a readable config.json and a weights file. EvalInputError naming the path and key otherwise."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EvalInputError(f"{path}: {'not a directory' if p.exists() else 'no such directory'}", key)
    if (p / "export" / "config.json").is_file() and not _is_hf_config(p / "config.json"):
        p = p / "export"  # a run directory (runs/<stage>): its own config.json is the run's, not the model's
    config = p / "config.json"
    if not config.is_file():
        raise EvalInputError(f"{path}: no config.json or export/config.json (not an HF export or a run "
                             "directory)", key)
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{config}: corrupt export, config.json is not valid JSON ({e})", key) from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vocab_size"), int):
        raise EvalInputError(f"{config}: corrupt export, config.json has no integer vocab_size", key)
    if not any(p.glob("model.safetensors*")) and not (p / "pytorch_model.bin").is_file():
        raise EvalInputError(f"{p}: corrupt export, no weights (model.safetensors or pytorch_model.bin)", key)
    if (p / "model.safetensors").is_file():  # its header only: a cheap check before anything is generated
        from safetensors import safe_open

        try:
            with safe_open(str(p / "model.safetensors"), framework="pt"):
                pass
        except Exception as e:
            raise EvalInputError(f"{p / 'model.safetensors'}: corrupt export ({type(e).__name__}: {e})", key) from e
    return p


def _is_hf_config(path: Path) -> bool:
    """Whether `path` is an HF model config (a run directory's config.json is the run's settings instead)."""
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _vocab_size(directory: Path) -> int:
    return json.loads((directory / "config.json").read_text())["vocab_size"]


def _load_tokenizer(directory: Path, key: str):
    try:
        return load_tokenizer(directory)
    except Exception as e:  # a corrupt marker, missing tokenizer files: say which export
        raise EvalInputError(f"{directory}: cannot load its tokenizer ({type(e).__name__}: {e})", key) from e


def _load_model(directory: Path, device, key: str) -> GPT:
    try:
        model = GPT.from_pretrained(str(directory))
    except Exception as e:  # truncated safetensors, wrong shapes, ...: say which export
        raise EvalInputError(f"{directory}: cannot load the model ({type(e).__name__}: {e})", key) from e
    return model.to(device).eval().requires_grad_(False)


def default_names(paths: list[Path]) -> list[str]:
    """runs/demo/ppo/export -> "ppo"; repeated names get their position appended."""
    names = [p.parent.name if p.name == "export" else p.name for p in paths]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def eval_prompts(cfg: EvalConfig) -> list[str]:
    """The held-out prompts: a prompt file's held-out tail, or the task's own held-out draw."""
    if cfg.prompts is not None:
        if not Path(cfg.prompts).exists():
            raise EvalInputError(f"{cfg.prompts}: no such file", "prompts")
        return load_prompts(cfg.prompts, eval_size=cfg.num_prompts, seed=cfg.seed,
                            skip_bad_examples=cfg.skip_bad_examples)[1]
    if cfg.task_name == "arithmetic":  # within GRPO's held-out problems (same seed, same shuffle)
        return [p.prompt for p in arithmetic_split(cfg.num_prompts, cfg.seed)[1]]
    # synthetic (EvalConfig refuses the tasks without built-in prompts): the demo's held-out draw (the prompt
    # space is small: 32 prompts)
    return synthetic_prompts(cfg.num_prompts, cfg.seed + HELD_OUT_SEED_OFFSET)


# --- sampling and scoring -------------------------------------------------------------------------------


class _Unscored(Scorer):
    """No reward model: zeros, which are reported as no score at all."""

    def __call__(self, rollout) -> torch.Tensor:
        return torch.zeros(rollout.prompt_ids.shape[0], device=rollout.prompt_ids.device)


@dataclass
class PolicyResponses:
    """One policy's answers. Sampled rows g*K .. g*K + K - 1 answer prompt g (K = samples)."""

    name: str
    path: str
    completions: list[str]  # (N*K,)
    greedy: list[str]  # (N,)
    lengths: torch.Tensor  # (N*K,) response tokens, EOS included
    truncated: torch.Tensor  # (N*K,) bool: cut at max_new_tokens
    kl: torch.Tensor  # (N*K,) summed k1 to the reference (0 for the reference itself)
    scores: torch.Tensor | None = None  # (N*K,) reward model
    greedy_scores: torch.Tensor | None = None  # (N,)
    gold: torch.Tensor | None = None  # (N*K,)
    greedy_gold: torch.Tensor | None = None  # (N,)
    summary: dict = field(default_factory=dict)


def sample_policy(policy: GPT, reference: GPT | None, tokenizer, prompts: list[str], cfg: EvalConfig,
                  scorer: Scorer | None) -> dict:
    """Sampled + greedy responses of `policy` with their RM scores, lengths and KL to `reference` (None:
    the policy is the reference, KL 0)."""
    maker = ExperienceMaker(PPOModels(policy, reference=reference), max_new_tokens=cfg.new_tokens,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            advantage=AdvantageConfig("reinforce_pp"), temperature=cfg.temperature,
                            scorer=scorer or _Unscored(), reference=reference is not None)
    keep = policy.config.n_positions - cfg.new_tokens  # prompts cut from the left to leave room
    encoded = [(tokenizer.encode(p) or [tokenizer.eos_token_id])[-keep:] for p in prompts]
    r = held_out_responses(maker, tokenizer, encoded, prompts, batch_size=cfg.batch_size, samples=cfg.samples,
                           seed=cfg.seed, greedy=True, kl=reference is not None)
    release_kv_caches(policy)
    return dict(completions=r.completions, greedy=r.greedy, lengths=r.lengths, truncated=r.truncated,
                kl=r.kl if r.kl is not None else torch.zeros(len(r.completions)),
                scores=r.scores if scorer else None, greedy_scores=r.greedy_scores if scorer else None)


def _gold_scores(fn, prompts: list[str], completions: list[str]) -> torch.Tensor:
    return score_completions(fn, prompts, completions).double()


def _mean(x: torch.Tensor | None) -> float | None:
    return None if x is None else float(x.double().mean())


def _std(x: torch.Tensor | None) -> float | None:
    return None if x is None else float(x.double().std()) if len(x) > 1 else 0.0


def summarize(r: PolicyResponses) -> dict:
    """Scalar metrics of one policy's responses (None where there is no reward model / gold reward)."""
    return {
        "name": r.name, "path": r.path,
        "reward": _mean(r.scores), "reward_std": _std(r.scores), "greedy_reward": _mean(r.greedy_scores),
        "gold": _mean(r.gold), "gold_std": _std(r.gold), "greedy_gold": _mean(r.greedy_gold),
        "kl": _mean(r.kl),
        **length_stats(r.lengths, r.truncated),
        "distinct_1": distinct_n(r.completions, 1), "distinct_2": distinct_n(r.completions, 2),
        "repetition": sum(repetition(c) for c in r.completions) / len(r.completions),
    }


def compare(results: list[PolicyResponses], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """(win_rates, alarms): every ordered pair by the RM and by the gold reward, on the sampled and on the
    greedy responses; alarms of every policy against the first."""
    win_rates, table = [], {}
    for judge, key in (("reward_model", "scores"), ("gold", "gold")):
        for responses, attr, group in (("sampled", key, cfg.samples), ("greedy", f"greedy_{key}", 1)):
            for a in results:
                for b in results:
                    if a is not b and getattr(a, attr) is not None:
                        wr = win_rate(getattr(a, attr), getattr(b, attr), group_size=group, seed=cfg.seed)
                        table[a.name, b.name, judge, responses] = wr
                        win_rates.append({"policy": a.name, "baseline": b.name, "judge": judge,
                                          "responses": responses, **wr.as_dict()})
    base, found = results[0], []
    for r in results[1:]:
        wins = {f"{g}{j}_win": table.get((r.name, base.name, judge, responses))
                for j, judge in (("rm", "reward_model"), ("gold", "gold"))
                for g, responses in (("", "sampled"), ("greedy_", "greedy"))}
        for alarm in alarms(r.summary, base.summary, **wins):
            found.append({"policy": r.name, "baseline": base.name, **alarm})
    return win_rates, found


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate the policies of `cfg`; writes eval.json, eval.md, eval.png and samples.md, returns the result."""
    dirs = [resolve_export(p, "policies") for p in cfg.policies]
    ref_key = "reference" if cfg.reference else "policies"  # which setting names each directory, for errors
    ref_dir = resolve_export(cfg.reference, "reference") if cfg.reference else dirs[0]
    rm_dir = resolve_export(cfg.reward_model, "reward_model") if cfg.reward_model else None
    tokenizer = _load_tokenizer(dirs[0], "policies")
    others = [(d, "policies") for d in dirs[1:]] + [(ref_dir, ref_key)] + ([(rm_dir, "reward_model")] if rm_dir else [])
    for d, key in others:
        if tokenizer_signature(_load_tokenizer(d, key)) != tokenizer_signature(tokenizer) or \
                _vocab_size(d) != _vocab_size(dirs[0]):
            raise EvalInputError(f"{d}: a different tokenizer / vocabulary than {dirs[0]}: policies, reference "
                                 "and reward model must share one", key)
    names = list(cfg.names) if cfg.names else default_names(dirs)
    prompts = eval_prompts(cfg)
    gold_fn = gold_reward(cfg.task_name)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    scorer = None
    if rm_dir is not None:
        try:
            scorer = load_reward_model_scorer(rm_dir, tokenizer, _vocab_size(dirs[0]), device)
        except Exception as e:
            raise EvalInputError(f"{rm_dir}: {type(e).__name__}: {e}", "reward_model") from e
    reference = _load_model(ref_dir, device, ref_key)
    results = []
    for name, d in zip(names, dirs):
        same = d.resolve() == ref_dir.resolve()
        policy = reference if same else _load_model(d, device, "policies")
        out = sample_policy(policy, None if same else reference, tokenizer, prompts, cfg, scorer)
        r = PolicyResponses(name, str(d), **out)
        if gold_fn is not None:
            r.gold = _gold_scores(gold_fn, [p for p in prompts for _ in range(cfg.samples)], r.completions)
            r.greedy_gold = _gold_scores(gold_fn, prompts, r.greedy)
        r.summary = summarize(r)
        results.append(r)
        del policy
    win_rates, found = compare(results, cfg)
    result = {
        "task": cfg.task_name, "gold": GOLD_DESCRIPTIONS.get(cfg.task_name) if gold_fn else None,
        "reward_model": str(rm_dir) if rm_dir else None, "reference": str(ref_dir), "prompts": len(prompts),
        "samples": cfg.samples, "max_new_tokens": cfg.new_tokens, "temperature": cfg.temperature,
        "seed": cfg.seed, "policies": [r.summary for r in results], "win_rates": win_rates, "alarms": found,
        "config": asdict(cfg),
    }
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    (out_dir / "eval.md").write_text(format_markdown(result) + "\n")
    write_plot(result, out_dir / "eval.png")
    write_samples(prompts, results, cfg.samples, out_dir / "samples.md")
    result["files"] = {k: str(out_dir / f) for k, f in
                       (("json", "eval.json"), ("table", "eval.md"), ("plot", "eval.png"), ("samples", "samples.md"))}
    return result


def eval_command(config: EvalConfig) -> int:
    """`rlhf-fast eval`: run, print the table and the files written."""
    result = run_eval(config)
    print(format_markdown(result))
    print("\nwrote " + ", ".join(result["files"].values()))
    return 0


# --- reports --------------------------------------------------------------------------------------------


def _num(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _win(result: dict, policy: str, baseline: str, judge: str = "reward_model",
         responses: str = "sampled") -> dict | None:
    return next((w for w in result["win_rates"] if (w["policy"], w["baseline"], w["judge"], w["responses"]) ==
                 (policy, baseline, judge, responses)), None)


def _ci(w: dict | None, interval: bool = True) -> str:
    if w is None:
        return "-" if not interval else "n/a"
    return f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]" if interval else f"{w['rate']:.2f}"


def format_markdown(result: dict) -> str:
    """The table of eval.md (also what the CLI prints)."""
    pols, base = result["policies"], result["policies"][0]["name"]
    lines = [f"# rlhf-fast eval: {result['prompts']} held-out prompts x {result['samples']} samples "
             f"(+1 greedy), task {result['task']}",
             "",
             f"reward model: {result['reward_model'] or 'none'}; reference (KL): {result['reference']}; "
             f"gold: {result['gold'] or 'none'}; temperature {result['temperature']}, seed {result['seed']}",
             "",
             "| policy | RM score | RM greedy | gold | gold greedy | KL (nats/seq) | length (tok) | cut | "
             "distinct-1 / -2 | repetition |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pols:
        lines.append(f"| {p['name']} | {_num(p['reward'], '+.3f')} | {_num(p['greedy_reward'], '+.3f')} | "
                     f"{_num(p['gold'], '+.3f')} | {_num(p['greedy_gold'], '+.3f')} | {_num(p['kl'], '.3f')} | "
                     f"{p['length']:.1f} | {p['truncated_frac']:.0%} | {p['distinct_1']:.3f} / {p['distinct_2']:.3f} "
                     f"| {p['repetition']:.3f} |")
    if len(pols) > 1:
        lines += ["", f"win-rates over {base} [95% CI] (ties count 1/2):", "",
                  "| policy | RM, sampled | RM, greedy | gold, sampled | gold, greedy |", "|---|---:|---:|---:|---:|"]
        for p in pols[1:]:
            cells = [_ci(_win(result, p["name"], base, judge, responses))
                     for judge in ("reward_model", "gold") for responses in ("sampled", "greedy")]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    if len(pols) > 2 and result["reward_model"]:
        lines += ["", "RM win-rate of the row over the column:", "",
                  "| | " + " | ".join(p["name"] for p in pols) + " |", "|---" * (len(pols) + 1) + "|"]
        for a in pols:
            cells = [_ci(_win(result, a["name"], b["name"]), interval=False) for b in pols]
            lines.append(f"| {a['name']} | " + " | ".join(cells) + " |")
    lines += ["", "alarms:" if result["alarms"] else "alarms: none"]
    lines += [f"- {a['policy']}: {a['alarm']}: {a['message']}" for a in result["alarms"]]
    return "\n".join(lines)


def write_plot(result: dict, path) -> Path:
    """eval.png: per policy, the RM score, the RM win-rate over the baseline (95% CI), the gold reward (each for
    sampled and greedy responses), the KL and the length."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pols = result["policies"]
    names, base = [p["name"] for p in pols], pols[0]["name"]

    def wins(responses):
        return [_win(result, n, base, "reward_model", responses) for n in names]

    def series(label, values, err=None):
        return label, [math.nan if v is None else v for v in values], err  # nan: no bar (baseline, no score)

    def win_series(responses):
        ws = wins(responses)
        return series(responses, [w["rate"] if w else None for w in ws],
                      [[w["rate"] - w["low"] if w else 0 for w in ws], [w["high"] - w["rate"] if w else 0 for w in ws]])

    panels = [
        ("RM score", [series("sampled", [p["reward"] for p in pols]),
                      series("greedy", [p["greedy_reward"] for p in pols])]),
        (f"RM win-rate vs {base} (95% CI)", [win_series("sampled"), win_series("greedy")]),
        ("gold reward", [series("sampled", [p["gold"] for p in pols]),
                         series("greedy", [p["greedy_gold"] for p in pols])]),
        ("KL to reference (nats/seq)", [series("sampled", [p["kl"] for p in pols])]),
        ("response length (tokens)", [series("sampled", [p["length"] for p in pols])]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.5))
    for ax, (title, group) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        if all(math.isnan(v) for _, values, _ in group for v in values):
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        width = 0.8 / len(group)
        for k, (label, values, err) in enumerate(group):
            x = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
            ax.bar(x, values, width, yerr=err, capsize=3, label=label)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        if "win-rate" in title:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        if len(group) > 1:
            ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


_LINE_BREAKS = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # str.splitlines' breaks


def _cell(text: str) -> str:
    if not text:
        return "*(empty)*"
    text = _LINE_BREAKS.sub("⏎", text)  # any line break (a bare \r too) would end the table row
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _scores(r: PolicyResponses, i: int, greedy: bool) -> str:
    s, g = (r.greedy_scores, r.greedy_gold) if greedy else (r.scores, r.gold)
    parts = ([] if s is None else [f"rm {float(s[i]):+.2f}"]) + ([] if g is None else [f"gold {float(g[i]):+.1f}"])
    return f" ({', '.join(parts)})" if parts else ""


def write_samples(prompts: list[str], results: list[PolicyResponses], samples: int, path) -> Path:
    """samples.md: per prompt, a table with one column per policy: the greedy response, then the samples."""
    lines = [f"# Samples: {len(prompts)} prompts, greedy + {samples} sampled responses per policy", ""]
    for g, prompt in enumerate(prompts):
        lines += [f"## Prompt {g + 1}", "", "```", prompt.strip("\n"), "```", "",
                  "| | " + " | ".join(r.name for r in results) + " |", "|---" * (len(results) + 1) + "|"]
        lines.append("| greedy | " + " | ".join(_cell(r.greedy[g]) + _scores(r, g, True) for r in results) + " |")
        for k in range(samples):
            i = g * samples + k
            lines.append(f"| sample {k + 1} | " + " | ".join(_cell(r.completions[i]) + _scores(r, i, False)
                                                              for r in results) + " |")
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)
