"""Memory plan: the peak device memory of a run, phase by phase, from the model's shape alone.

`rlhf-fast plan` prints it, the trainers check it at start-up on CUDA (`check_trainer_memory`), and the
numbers of docs/memory.md are generated from it (`rlhf-fast plan --write-docs`; a test checks them).
Pure arithmetic: nothing is allocated, and this module imports nothing beyond the standard library (and the
leaf modules rlhf_fast.config / rlhf_fast.errors).

An RL iteration runs its phases one after another, so the peak is the largest phase on top of what stays
resident:
  resident    weights, adapters, optimizer state, and the KV cache once generation has made it
              (`generation.generate` keeps it per shape, for its CUDA graphs, until the run ends)
  generation  the prefill of the whole rollout batch (a decode step is far smaller)
  scoring     the no-grad passes of the experience maker (reward, policy, reference, value), one at a
              time, each over the whole rollout batch (or `score_rows` rows at a time)
  update      one micro-batch forward + backward; PPO keeps the policy and the value forward for one
              backward (`separate_updates`: one model's forward + backward at a time)
SFT, RM and DPO have only the update (DPO's no-grad reference pass runs inside it).

The rules, in bytes (a: the autocast dtype's size, w: the weights' size, L layers of width C, vocab V):
  parameters       P = V·C + n_positions·C + L·(12·C² + 13·C) + 2·C (the lm-head is tied to wte)
  LoRA adapter     16·r·C per layer on attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (model.lora)
  optimizer        one device: Adam m and v and the gradients in the trained parameters' dtype (torch's
                   optimizers); DeepSpeed: fp32 masters, m and v (12 B/p) and fp32 gradients
  KV cache         2·L·rows·T·C·a, T = prompt + response rounded up to CACHE_BUCKET
  activations      34·C·a/2 per token and layer kept for backward (Korthikanti et al. 2022 with fused
                   attention: no T² scores); checkpointed, one block input per layer (C·w: the residual
                   stream has the weights' dtype) plus one block recomputed at a time
  16-bit copies    fp32 weights under bf16/fp16 autocast: a forward saves the 16-bit copy of each linear
                   weight it used (12·C²·L·a) for its backward, unless checkpointing frees them per block
  log-probs        fused lm-head (kernels.linear_logprobs): O(N) fp32 vectors + one LOGPROB_CHUNK_BYTES
                   chunk (+ the hidden states' gradient in the update); unfused: N·V·(a + 4) for the logits
                   and their fp32 log-softmax, twice that with gradients
  no-grad forward  FORWARD_WORKSET_CHANNELS·C·a per token: the temporaries of one block at a time
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf_fast.config import option, section
from rlhf_fast.errors import ConfigError

from .metrics import log

GIB = 2**30
ACT_BYTES_PER_CHANNEL = 34  # per token, layer and channel at 2-byte activations (Korthikanti et al. 2022)
FORWARD_WORKSET_CHANNELS = 10  # no-grad block: residual + LayerNorm output (2C) + MLP input and GELU (8C)
# kernels.linear_logprobs' token-chunk buffer on a GPU: chunk_tokens = max(1, LOGPROB_CHUNK_BYTES // (V·4))
# rows of fp32 logits at a time. Must equal the kernel's constant (its author reconciles the two).
LOGPROB_CHUNK_BYTES = 256 * 2**20
LOGPROB_VECTORS = 4  # fp32-sized per-token vectors of the fused pass: log-prob, logsumexp, entropy, target
CACHE_BUCKET = 128  # generation.CACHE_BUCKET: the KV cache length's granularity (a test keeps them equal)
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000  # distributed.deepspeed.BUCKET_ELEMENTS (reduce / all-gather buckets)
RESERVE_FRACTION = 0.10  # of the budget held back: CUDA context, cuBLAS/Triton workspaces, fragmentation
ALGOS = ("ppo", "grpo", "dpo", "sft", "rm")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STRATEGIES = ("single", "deepspeed")
ENV_SWITCH = "RLHF_FAST_MEMORY_PLAN"  # "warn": the start-up check logs instead of refusing


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a GPT-2: L, C, V and the position table."""

    name: str
    n_layer: int
    n_embd: int
    vocab_size: int = 50257
    n_positions: int = 1024

    @classmethod
    def from_config(cls, config, name: str = "model") -> ModelShape:
        """From a `GPTConfig` (or anything with its four fields)."""
        return cls(name, config.n_layer, config.n_embd, config.vocab_size, config.n_positions)

    @classmethod
    def from_preset(cls, name: str) -> ModelShape:
        from rlhf_fast.model.gpt2 import preset_config

        return cls.from_config(preset_config(name), name)

    @classmethod
    def from_hf_dir(cls, directory) -> ModelShape:
        """From an HF GPT-2 directory's config.json (no weights are read)."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
        try:
            cfg = json.loads(path.read_text())
            return cls(Path(directory).name, int(cfg["n_layer"]), int(cfg["n_embd"]), int(cfg["vocab_size"]),
                       int(cfg.get("n_positions", cfg.get("n_ctx", 1024))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: need n_layer, n_embd and vocab_size of a GPT-2 config ({e})") from e

    @property
    def params(self) -> int:
        L, C = self.n_layer, self.n_embd
        return self.vocab_size * C + self.n_positions * C + L * (12 * C * C + 13 * C) + 2 * C

    @property
    def block_linear_params(self) -> int:
        """The weights of the four linears of every block (what autocast copies to 16 bits)."""
        return 12 * self.n_embd**2 * self.n_layer

    def lora_params(self, rank: int) -> int:
        return 16 * rank * self.n_embd * self.n_layer


@dataclass(frozen=True)
class PlanSettings:
    """A run's memory-relevant settings. Rows are sequences; rm and dpo micro-batches hold pairs (2 rows)."""

    algo: str = option("ppo", "ppo (with a critic), grpo (critic-free), dpo, sft or rm", choices=ALGOS)
    lora: bool = option(True, "LoRA adapters on one frozen base (--no-lora: the trained models in full)")
    lora_rank: int = option(8, "LoRA rank")
    precision: str = option("bf16", "fp32, bf16 or fp16 autocast", choices=PRECISIONS)
    strategy: str = option("single", "single (fp32 master weights under autocast) or deepspeed (ZeRO 0-2: a 16-bit "
                                     "module)", choices=STRATEGIES)
    weight_dtype: str | None = option(None, "fp32, bf16 or fp16 weights on the device (default: fp32 on one device, "
                                            "the --precision dtype under deepspeed)", choices=PRECISIONS)
    offload_optimizer: bool = option(False, "deepspeed: fp32 masters, Adam state and gradients on the CPU")
    rollout_batch_size: int = option(64, "RL: prompts per rollout")
    group_size: int = option(1, "RL: responses per prompt")
    prompt_len: int = option(256, "prompt tokens (the padded width)")
    response_len: int = option(128, "response tokens (RL: --max-new-tokens)")
    micro_batch_size: int = option(8, "rows per training forward (rm, dpo: pairs)")
    grad_checkpoint: bool = option(False, "activation checkpointing per transformer block")
    score_rows: int | None = option(None, "RL: rows per no-grad scoring pass; None: the whole rollout (the "
                                          "experience maker)", cli=False)
    separate_updates: bool = option(False, "PPO: the critic's forward + backward after the policy's; False: one "
                                           "backward", cli=False)
    fused_logprobs: bool = option(True, "the fused lm-head log-prob kernel (--no-fused-logprobs: logits "
                                        "materialised)")
    reference: bool | None = option(None, "a reference pass; None: ppo, grpo and dpo have one", cli=False)
    reward_model: bool | None = option(None, "a reward-model pass; None: ppo's (grpo scores with a function)",
                                       cli=False)
    separate_frozen: int | None = option(None, "separate frozen models; None: 0 with LoRA, else reference + RM",
                                         cli=False)
    offload_frozen: bool = option(False, "separate frozen models (reference, reward) on the CPU between uses")

    def __post_init__(self):  # ConfigErrors naming the field (`rlhf-fast plan` turns it into the flag)
        for name, allowed in (("algo", ALGOS), ("precision", PRECISIONS), ("strategy", STRATEGIES),
                              ("weight_dtype", PRECISIONS + (None,))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"memory plan: {name} must be one of {allowed}, got {getattr(self, name)!r}", name)
        for name in ("lora_rank", "rollout_batch_size", "group_size", "prompt_len", "response_len",
                     "micro_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"memory plan: {name} must be an int >= 1, got {value!r}", name)
        if self.score_rows is not None and (not isinstance(self.score_rows, int) or isinstance(self.score_rows, bool)
                                            or self.score_rows < 1):
            raise ConfigError(f"memory plan: score_rows must be None or an int >= 1, got {self.score_rows!r}",
                              "score_rows")
        if self.offload_optimizer and self.strategy != "deepspeed":
            raise ConfigError("memory plan: offload_optimizer needs strategy='deepspeed' (ZeRO-Offload)",
                              "offload_optimizer")
        if self.rl and self.micro_batch_size > self.rows:
            raise ConfigError(f"memory plan: micro_batch_size {self.micro_batch_size} exceeds the rollout's "
                              f"{self.rows} rows", "micro_batch_size")

    @property
    def rl(self) -> bool:
        return self.algo in ("ppo", "grpo")

    @property
    def critic(self) -> bool:
        return self.algo == "ppo"

    @property
    def rows(self) -> int:
        return self.rollout_batch_size * self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def scored_len(self) -> int:
        """The longest sequence any pass reads: RL reward-model scoring appends an EOS to a truncated response."""
        return self.seq_len + int(self.rl and self.has_reward_model)

    @property
    def scoring_rows(self) -> int:
        return min(self.score_rows or self.rows, self.rows)

    @property
    def micro_rows(self) -> int:
        return self.micro_batch_size * (2 if self.algo in ("dpo", "rm") else 1)

    @property
    def has_reference(self) -> bool:
        return self.algo in ("ppo", "grpo", "dpo") if self.reference is None else self.reference

    @property
    def has_reward_model(self) -> bool:
        return self.algo == "ppo" if self.reward_model is None else self.reward_model

    @property
    def n_frozen(self) -> int:
        if self.separate_frozen is not None:
            return self.separate_frozen
        return 0 if self.lora else int(self.has_reference) + int(self.has_reward_model)

    @property
    def weights(self) -> str:
        """The weights' dtype on the device: fp32 masters under autocast (single), DeepSpeed's cast module."""
        if self.weight_dtype is not None:
            return self.weight_dtype
        return "fp32" if self.strategy == "single" else self.precision

    @property
    def activations(self) -> str:
        return self.weights if self.precision == "fp32" else self.precision  # autocast's dtype, else the weights'

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.activations]

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weights]

    @property
    def optimizer_bytes(self) -> int:
        """Adam m and v (+ DeepSpeed's fp32 master) per trained parameter on the device."""
        return 12 if self.strategy == "deepspeed" else 2 * self.weight_bytes

    @property
    def grad_dtype(self) -> str:
        return "fp32" if self.strategy == "deepspeed" else self.weights

    @property
    def casts_weights(self) -> bool:
        """Autocast copies each weight into another dtype for its matmul (fp32 masters under bf16, ...)."""
        return self.weights != self.activations

    def describe(self) -> str:
        mode = f"LoRA r={self.lora_rank}" if self.lora else "full-parameter"
        where = "one device" if self.strategy == "single" else "DeepSpeed ZeRO" + (
            "-2 + CPU optimizer offload" if self.offload_optimizer else "")
        return f"{mode} {self.algo.upper()}, {self.precision}, {where}"

    def layout(self) -> str:
        seq = f"({self.prompt_len} prompt + {self.response_len} response)"
        rows = f"rollout {self.rollout_batch_size}" + (f"x{self.group_size}" if self.group_size > 1 else "")
        micro = f"micro-batch {self.micro_batch_size}" + (" pairs" if self.micro_rows > self.micro_batch_size else "")
        head = "fused lm-head log-probs" if self.fused_logprobs else "unfused log-probs"
        ckpt = "checkpointing " + ("on" if self.grad_checkpoint else "off")
        extra = ([f"scoring {self.scoring_rows} rows at a time"] if self.rl and self.scoring_rows < self.rows else [])
        extra += ["policy and critic updated one after the other"] if self.critic and self.separate_updates else []
        return ", ".join(([f"{rows} x {seq} tokens"] if self.rl else [f"sequences of {seq} tokens"])
                         + [micro, ckpt, head] + extra)


@dataclass(frozen=True)
class Item:
    label: str
    arithmetic: str
    nbytes: float


@dataclass(frozen=True)
class Phase:
    name: str
    items: tuple[Item, ...]

    @property
    def nbytes(self) -> float:
        return sum(i.nbytes for i in self.items)


# --- the arithmetic ---------------------------------------------------------------------------------


def _m(n: float) -> str:
    if n < 1e6:
        return f"{n:,.0f}"
    return f"{n / 1e6:,.1f} M" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _resident(shape: ModelShape, s: PlanSettings) -> tuple[list[Item], float]:
    """(device items, host bytes): what stays on the device in every phase, and what offload keeps on the CPU."""
    P, w, a = shape.params, s.weight_bytes, s.act_bytes
    ds, off, adam = s.strategy == "deepspeed", s.offload_optimizer, s.optimizer_bytes
    items, host = [], 0.0
    if s.lora:
        names = ["policy"] + ["value"] * s.critic + ["reward"] * s.has_reward_model
        n_trained, lp = 1 + s.critic, shape.lora_params(s.lora_rank)
        items.append(Item(f"frozen base, {s.weights}", f"{_m(P)} · {w} B", P * w))
        items.append(Item(f"adapters {' + '.join(names)}, {s.weights}", f"{len(names)} · {_m(lp)} · {w} B",
                          len(names) * lp * w))
        state = n_trained * lp * adam
        label = "Adam m and v" + (" + fp32 masters" if ds else "") + f" of {' + '.join(names[:n_trained])}"
        if off:
            host += state
        else:
            items.append(Item(label, f"{n_trained} · {_m(lp)} · {adam} B", state))
    else:
        n_trained = 1 + s.critic
        who = "policy + critic" if s.critic else "policy"
        items.append(Item(f"{who} weights, {s.weights}", f"{n_trained} · {_m(P)} · {w} B", n_trained * P * w))
        if off:
            host += n_trained * P * 16  # fp32 master, Adam m, v, fp32 gradient
        else:
            label = "Adam m and v" + (" + fp32 masters" if ds else "") + f" of {who}"
            items.append(Item(label, f"{n_trained} · {_m(P)} · {adam} B", n_trained * P * adam))
    if s.n_frozen and not s.offload_frozen:
        items.append(Item(f"separate frozen models, {s.weights}", f"{s.n_frozen} · {_m(P)} · {w} B",
                          s.n_frozen * P * w))
    if ds:
        engines = 1 if s.lora else n_trained
        items.append(Item("ZeRO reduce + all-gather buckets", f"{engines} · 2 · {_m(DEEPSPEED_BUCKET_ELEMENTS)} · "
                          f"{a} B", engines * 2 * DEEPSPEED_BUCKET_ELEMENTS * a))
    if s.rl:
        T = kv_cache_len(s.seq_len, shape.n_positions)
        items.append(Item(f"KV cache {s.rows} x {T}, kept after generation",
                          f"2 · {shape.n_layer} · {s.rows} · {T} · {shape.n_embd} · {a} B",
                          2 * shape.n_layer * s.rows * T * shape.n_embd * a))
    return items, host


def kv_cache_len(total_len: int, n_positions: int) -> int:
    """generation.cache_length: prompt + response rounded up to CACHE_BUCKET, at most n_positions."""
    return min(-(-total_len // CACHE_BUCKET) * CACHE_BUCKET, n_positions)


def logprob_chunk_tokens(n_tokens: int, vocab_size: int) -> int:
    return min(n_tokens, max(1, LOGPROB_CHUNK_BYTES // (vocab_size * 4)))


def _logprob_items(shape: ModelShape, s: PlanSettings, n: int, grad: bool) -> list[Item]:
    """The lm-head's log-prob pass over n tokens (their hidden states are counted by the caller)."""
    V, C, a = shape.vocab_size, shape.n_embd, s.act_bytes
    items = []
    if s.casts_weights:  # autocast casts the head (and a backward keeps the copy)
        items.append(Item(f"{s.activations} copy of the lm-head weight", f"{V:,} · {C} · {a} B", V * C * a))
    if not s.fused_logprobs:
        k = 2 if grad else 1
        return items + [Item("logits + fp32 log-softmax" + (", and their gradients" if grad else ""),
                             f"{k} · {n:,} · {V:,} · ({a} + 4) B", k * n * V * (a + 4))]
    chunk = logprob_chunk_tokens(n, V)
    items += [Item(f"fused log-probs: {chunk:,}-token chunk of fp32 logits", f"{chunk:,} · {V:,} · 4 B", chunk * V * 4),
              Item("fused log-probs: per-token vectors", f"{LOGPROB_VECTORS} · {n:,} · 4 B", LOGPROB_VECTORS * n * 4)]
    if grad:
        items.append(Item("gradient of the hidden states", f"{n:,} · {C} · {a} B", n * C * a))
    return items


def _no_grad_pass(shape: ModelShape, s: PlanSettings, rows: int, what: str) -> list[Item]:
    """A no-grad forward over `rows` whole sequences: one block's temporaries at a time, then the final
    hidden states."""
    C, a, tokens = shape.n_embd, s.act_bytes, rows * s.seq_len
    items = [Item(f"{what}: block temporaries", f"{tokens:,} · {FORWARD_WORKSET_CHANNELS} · {C} · {a} B",
                  tokens * FORWARD_WORKSET_CHANNELS * C * a),
             Item(f"{what}: final hidden states", f"{tokens:,} · {C} · {a} B", tokens * C * a)]
    return items


def _generation(shape: ModelShape, s: PlanSettings) -> Phase:
    C, a, rows, P = shape.n_embd, s.act_bytes, s.rows, s.prompt_len
    tokens = rows * P
    return Phase("generation", (
        Item("prefill: block temporaries", f"{tokens:,} · {FORWARD_WORKSET_CHANNELS} · {C} · {a} B",
             tokens * FORWARD_WORKSET_CHANNELS * C * a),
        Item("next-token logits, fp32", f"{rows} · {shape.vocab_size:,} · 4 B", rows * shape.vocab_size * 4),
    ))


def _scoring(shape: ModelShape, s: PlanSettings) -> Phase:
    """The largest no-grad pass of the experience maker: a log-prob pass (policy, reference)."""
    rows = s.scoring_rows
    items = _no_grad_pass(shape, s, rows, "log-prob pass") + _logprob_items(shape, s, rows * s.response_len, grad=False)
    if s.n_frozen and s.offload_frozen:
        w = s.weight_bytes
        items.append(Item("a frozen model moved in for its pass", f"{_m(shape.params)} · {w} B", shape.params * w))
    return Phase("scoring", tuple(items))


def _update(shape: ModelShape, s: PlanSettings) -> Phase:
    L, C, a, w = shape.n_layer, shape.n_embd, s.act_bytes, s.weight_bytes
    rows = s.micro_rows
    tokens = rows * s.seq_len
    # PPO: the policy and the value forward share one backward, unless each model updates on its own
    forwards = 1 + (s.critic and not s.separate_updates)
    fw = f"{forwards} · " if forwards > 1 else ""
    g, gb = s.grad_dtype, DTYPE_BYTES[s.grad_dtype]
    items = []
    if not s.offload_optimizer:
        n = forwards
        what, params = ("adapter gradients", shape.lora_params(s.lora_rank)) if s.lora else ("gradients", shape.params)
        items.append(Item(f"{what}, {g}", f"{n} · {_m(params)} · {gb} B", n * params * gb))
    block = tokens * ACT_BYTES_PER_CHANNEL * C * a // 2  # one block's activations
    per_block = f"{tokens:,} · {ACT_BYTES_PER_CHANNEL} · {C} · {a}/2 B"
    if s.grad_checkpoint:
        items.append(Item("block inputs kept (checkpointing)", f"{fw}{tokens:,} · {L} · {C} · {w} B",
                          forwards * tokens * L * C * w))
        items.append(Item("one block recomputed + its gradients", f"2 · {per_block}", 2 * block))
        if s.casts_weights:
            items.append(Item(f"its {s.activations} weight copies", f"12 · {C}² · {a} B", 12 * C * C * a))
    else:
        items.append(Item("activations kept for backward", f"{fw}{L} · {per_block}", forwards * L * block))
        items.append(Item("one block's activation gradients", per_block, block))
        if s.casts_weights:
            items.append(Item(f"{s.activations} weight copies saved for backward",
                              f"{fw}{_m(shape.block_linear_params)} · {a} B", forwards * shape.block_linear_params * a))
    items.append(Item("final hidden states", f"{fw}{tokens:,} · {C} · {a} B", forwards * tokens * C * a))
    if s.algo != "rm":
        n_lp = rows * (s.seq_len if s.algo == "sft" else s.response_len)
        items += _logprob_items(shape, s, n_lp, grad=True)
    if s.algo == "dpo" and s.has_reference:
        items += _no_grad_pass(shape, s, rows, "reference pass")
        items += [Item(f"reference {i.label}", i.arithmetic, i.nbytes)
                  for i in _logprob_items(shape, s, rows * s.response_len, grad=False)]
        if s.n_frozen and s.offload_frozen:
            items.append(Item("the reference moved in", f"{_m(shape.params)} · {w} B", shape.params * w))
    return Phase("update", tuple(items))


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted device memory of one run: `resident` plus, at the peak, the largest phase."""

    shape: ModelShape
    settings: PlanSettings
    budget_gib: float
    resident: Phase
    phases: tuple[Phase, ...]
    host_bytes: float  # offloaded fp32 masters, Adam state and gradients in CPU memory

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.nbytes)

    def phase_gib(self, phase: Phase) -> float:
        return (self.resident.nbytes + phase.nbytes) / GIB

    @property
    def peak_gib(self) -> float:
        return self.phase_gib(self.peak_phase)

    @property
    def usable_gib(self) -> float:
        return self.budget_gib * (1 - RESERVE_FRACTION)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.usable_gib

    def summary(self) -> str:
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        return (f"peak {self.peak_gib:.2f} GiB ({self.peak_phase.name}) "
                f"{'<=' if self.fits else '>'} {self.usable_gib:.2f} GiB usable of {self.budget_gib:g} GiB: {verdict}")

    def table(self, markdown: bool = False) -> str:
        rows = [(f"**{self.resident.name}**", "", "")]
        rows += [(i.label, i.arithmetic, f"{i.nbytes / GIB:.2f}") for i in self.resident.items]
        rows.append(("total resident", "", f"{self.resident.nbytes / GIB:.2f}"))
        for p in self.phases:
            rows.append((f"**{p.name}**", "", ""))
            rows += [(i.label, i.arithmetic, f"{i.nbytes / GIB:.2f}") for i in p.items]
            mark = ": the peak" if p is self.peak_phase else ""
            rows.append((f"resident + {p.name}{mark}", f"{self.resident.nbytes / GIB:.2f} + {p.nbytes / GIB:.2f}",
                         f"{self.phase_gib(p):.2f}"))
        if markdown:
            lines = ["| item | arithmetic | GiB |", "|---|---|---:|"]
            return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])
        width = max(len(r[0]) for r in rows) + 4
        arith = max(len(r[1]) for r in rows) + 2
        out = [f"{'item'.ljust(width)}{'arithmetic'.ljust(arith)}{'GiB':>7}"]
        for label, formula, gib in rows:
            bold = label.startswith("**")
            label = label.strip("*")
            out.append(label if bold else f"  {label}".ljust(width) + formula.ljust(arith) + f"{gib:>7}")
        return "\n".join(out)

    def host_note(self) -> str:
        return f"CPU memory for the offloaded fp32 masters, Adam state and gradients: {self.host_bytes / GIB:.2f} GiB"

    def report(self) -> str:
        """The header, the table and the verdict, as `rlhf-fast plan` prints them."""
        sh, s = self.shape, self.settings
        lines = [f"memory plan: {sh.name} ({sh.params:,} parameters, L={sh.n_layer}, C={sh.n_embd}, "
                 f"V={sh.vocab_size:,}), {s.describe()}",
                 f"layout: {s.layout()}", "", self.table(), ""]
        if self.host_bytes:
            lines.append(self.host_note())
        lines.append(self.summary())
        return "\n".join(lines)


def plan_memory(shape: ModelShape, settings: PlanSettings, budget_gib: float = 16.0) -> MemoryPlan:
    """The memory plan of `settings` on a model of `shape` under a budget of `budget_gib` GiB."""
    if budget_gib <= 0:
        raise ValueError(f"memory plan: the budget must be > 0 GiB, got {budget_gib}")
    if settings.scored_len > shape.n_positions:
        raise ValueError(f"memory plan: prompt {settings.prompt_len} + response {settings.response_len}"
                         f"{' + 1 (the EOS scoring appends)' * (settings.scored_len > settings.seq_len)} tokens "
                         f"exceed the model's n_positions={shape.n_positions}")
    resident, host = _resident(shape, settings)
    phases = ([_generation(shape, settings), _scoring(shape, settings)] if settings.rl else [])
    phases.append(_update(shape, settings))
    return MemoryPlan(shape, settings, budget_gib, Phase("resident", tuple(resident)), tuple(phases), host)


# --- fits, a proposal, or a refusal ------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    plan: MemoryPlan  # the settings as given
    proposal: MemoryPlan | None  # the first settings that fit, when the given ones do not

    @property
    def fits(self) -> bool:
        return self.plan.fits

    @property
    def refused(self) -> bool:
        return not self.fits and self.proposal is None

    def flags(self, mini_batch: bool = False) -> str:
        """The CLI flags that turn the given settings into the proposal's (`--mini-batch-size` where the
        micro-batch is the minibatch: RL under DeepSpeed)."""
        if self.proposal is None:
            return ""
        old, new = self.plan.settings, self.proposal.settings
        out = []
        if new.rollout_batch_size != old.rollout_batch_size:
            out.append(f"--rollout-batch-size {new.rollout_batch_size}")
        if new.micro_batch_size != old.micro_batch_size:
            out.append(f"--{'mini' if mini_batch else 'micro'}-batch-size {new.micro_batch_size}")
        if new.grad_checkpoint != old.grad_checkpoint:
            out.append("--grad-checkpoint")
        return " ".join(out)

    def message(self) -> str:
        """One line: what fits, what to change, or why nothing does."""
        if self.fits:
            return self.plan.summary()
        if self.proposal is not None:
            return (f"{self.plan.summary()}; use {self.flags()} (peak {self.proposal.peak_gib:.2f} GiB in "
                    f"{self.proposal.peak_phase.name})")
        smallest = plan_memory(self.plan.shape, _smallest(self.plan.settings), self.plan.budget_gib)
        parts = " + ".join(f"{i.nbytes / GIB:.2f} ({i.label.split(',')[0]})" for i in smallest.resident.items)
        return (f"does not fit: resident {parts} = {smallest.resident.nbytes / GIB:.2f} GiB, plus "
                f"{smallest.peak_phase.nbytes / GIB:.2f} GiB in {smallest.peak_phase.name} even at micro-batch 1 "
                f"with checkpointing{' and rollout 1' if self.plan.settings.rl else ''} = "
                f"{smallest.peak_gib:.2f} GiB > {smallest.usable_gib:.2f} GiB usable of {self.plan.budget_gib:g} GiB"
                + ("" if self.plan.settings.lora else "; try --lora, or --strategy deepspeed --offload-optimizer"))


def _smallest(s: PlanSettings) -> PlanSettings:
    return replace(s, micro_batch_size=1, grad_checkpoint=True, rollout_batch_size=1 if s.rl else s.rollout_batch_size)


def decide(shape: ModelShape, settings: PlanSettings, budget_gib: float = 16.0) -> Verdict:
    """Fits as given; else the largest micro-batch (<= the given one) that fits, with checkpointing if
    needed; else (RL) the largest rollout batch that fits with them; else a refusal."""
    plan = plan_memory(shape, settings, budget_gib)
    if plan.fits:
        return Verdict(plan, None)

    def largest_micro(s: PlanSettings) -> MemoryPlan | None:
        for m in range(min(settings.micro_batch_size, s.rows if s.rl else settings.micro_batch_size), 0, -1):
            p = plan_memory(shape, replace(s, micro_batch_size=m), budget_gib)
            if p.fits:
                return p
        return None

    for ckpt in dict.fromkeys((settings.grad_checkpoint, True)):
        found = largest_micro(replace(settings, grad_checkpoint=ckpt))
        if found is not None:
            return Verdict(plan, found)
    if settings.rl:
        for r in range(settings.rollout_batch_size - 1, 0, -1):
            found = largest_micro(replace(settings, grad_checkpoint=True, rollout_batch_size=r,
                                          micro_batch_size=min(settings.micro_batch_size, r * settings.group_size)))
            if found is not None:
                return Verdict(plan, found)
    return Verdict(plan, None)


def format_verdict(verdict: Verdict) -> str:
    """What `rlhf-fast plan` prints: the plan as given, then the proposal's plan when there is one."""
    out = [verdict.plan.report()]
    if verdict.proposal is not None:
        out += ["", f"proposal: {verdict.flags()}", "", verdict.proposal.report()]
    if verdict.plan.settings.fused_logprobs:
        unfused = plan_memory((verdict.proposal or verdict.plan).shape,
                              replace((verdict.proposal or verdict.plan).settings, fused_logprobs=False),
                              verdict.plan.budget_gib)
        out += ["", f"without the fused lm-head kernel: {unfused.summary()}"]
    return "\n".join(out)


# --- the start-up check ------------------------------------------------------------------------------


def device_budget_gib(device) -> float:
    """GiB this process may use on a CUDA device: free memory plus what its allocator already holds, capped
    by `torch.cuda.set_per_process_memory_fraction` (how a 16 GiB card is emulated on a bigger one)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        budget = min(budget, torch.cuda.get_per_process_memory_fraction(device) * total)
    return budget / GIB


def trainer_plan_settings(trainer, scorer=None) -> tuple[ModelShape, PlanSettings]:
    """The shape and settings of a built trainer: an `RLTrainer` (its `scorer` argument: None = the models'
    reward role) or an SFT / RM / DPO `Trainer`."""
    rl_trainer, strategy = hasattr(trainer, "rl"), trainer.strategy
    model = trainer.models.policy if rl_trainer else trainer.module.model
    ds = strategy.kind == "deepspeed"  # casts the module itself when it prepares it
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    common = dict(precision=strategy.precision, strategy=strategy.kind,
                  weight_dtype=None if ds else {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype],
                  offload_optimizer=strategy.offloads_optimizer,
                  grad_checkpoint=model.config.grad_checkpoint)
    if rl_trainer:
        m, rl = trainer.models, trainer.rl
        items = getattr(getattr(trainer.prompts, "dataset", None), "items", [])
        longest = max([len(it["prompt_ids"]) for it in items] + [len(p) for p in trainer.eval_prompts] + [1])
        reward = getattr(scorer, "model", None)  # a ModelScorer of its own
        frozen = {id(f) for f in (m.reference, m.reward_model, reward) if f is not None and f is not model}
        settings = PlanSettings(
            algo="ppo" if rl.critic else "grpo", lora=m.lora,
            lora_rank=model.lora_configs["policy"].rank if m.lora else 8, rollout_batch_size=rl.rollout_batch_size,
            group_size=rl.group_size, prompt_len=longest, response_len=rl.max_new_tokens,
            micro_batch_size=min(rl.micro_rows, rl.rows),
            reference=bool(rl.init_kl_coef or rl.kl_target or rl.kl_loss_coef),
            reward_model=scorer is None or reward is not None, separate_frozen=len(frozen),
            offload_frozen=trainer.rl.offload_frozen, **common)
    else:
        c = trainer.config
        settings = PlanSettings(
            algo=c.stage, lora=bool(c.lora.enabled), lora_rank=c.lora.rank, prompt_len=c.data.max_prompt_len,
            response_len=c.data.max_len - c.data.max_prompt_len, micro_batch_size=c.optim.micro_batch_size,
            reference=getattr(trainer, "needs_reference", False), reward_model=False,
            separate_frozen=int(getattr(trainer, "reference", None) is not None),
            offload_frozen=c.stage == "dpo" and c.dpo.offload_reference, **common)
    name = getattr(trainer.config, "model", None)
    label = getattr(name, "model", None) or getattr(name, "preset", None) or "model"
    return ModelShape.from_config(model.config, str(label)), settings


def check_trainer_memory(trainer, scorer=None) -> MemoryPlan | None:
    """Start-up check of a trainer: on CUDA, refuse (ValueError naming the flags to change) a run whose plan
    does not fit the device, else log the plan; elsewhere do nothing. RLHF_FAST_MEMORY_PLAN=warn logs the
    refusal instead of raising."""
    device = trainer.strategy.device
    if device.type != "cuda":
        return None
    shape, settings = trainer_plan_settings(trainer, scorer)
    verdict = decide(shape, settings, device_budget_gib(device))
    if verdict.fits:
        log.info("memory plan: %s", verdict.plan.summary())
        return verdict.plan
    rl_ds = hasattr(trainer, "rl") and settings.strategy == "deepspeed"
    fix = (f"use {verdict.flags(mini_batch=rl_ds)} (peak {verdict.proposal.peak_gib:.2f} GiB)"
           if verdict.proposal is not None else verdict.message())
    message = (f"memory plan for {device}: {verdict.plan.summary()}; {fix} (`rlhf-fast plan` shows the arithmetic; "
               f"{ENV_SWITCH}=warn starts anyway)")
    if os.environ.get(ENV_SWITCH) == "warn":
        log.warning(message)
        return verdict.plan
    raise ValueError(message)


# --- docs/memory.md ----------------------------------------------------------------------------------

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
DOC_BEGIN = "<!-- memory-plan:begin (generated by `rlhf-fast plan --write-docs`) -->"
DOC_END = "<!-- memory-plan:end -->"
HEADLINE = PlanSettings()  # LoRA PPO, bf16, 64 x (256 + 128), micro-batch 8
OFFLOAD = replace(HEADLINE, lora=False, strategy="deepspeed", offload_optimizer=True, offload_frozen=True,
                  micro_batch_size=4)
DOC_CASES = (  # (title, preset, settings, budget GiB, with its own table)
    ("LoRA PPO", "gpt2-xl", HEADLINE, 16.0, True),
    ("LoRA PPO, DeepSpeed (bf16 base)", "gpt2-xl", replace(HEADLINE, strategy="deepspeed"), 16.0, False),
    ("LoRA PPO, bf16 base on one device", "gpt2-xl", replace(HEADLINE, weight_dtype="bf16"), 16.0, False),
    ("LoRA GRPO, 8 prompts x 8", "gpt2-xl", replace(HEADLINE, algo="grpo", rollout_batch_size=8, group_size=8), 16.0,
     False),
    ("LoRA DPO, micro-batch 4 pairs", "gpt2-xl", replace(HEADLINE, algo="dpo", micro_batch_size=4), 16.0, False),
    ("full PPO, ZeRO-2 + CPU optimizer offload, frozen models offloaded", "gpt2-large", OFFLOAD, 16.0, True),
    ("full PPO, one device", "gpt2-large", replace(HEADLINE, lora=False, micro_batch_size=4), 16.0, False),
    ("full PPO, ZeRO-2 + CPU optimizer offload, frozen models offloaded", "gpt2-xl", OFFLOAD, 16.0, False),
)


def _preset_table() -> str:
    lines = ["| model | L | C | P | fp32 weights | 16-bit weights | fp32 weights + grads + Adam (16 B/p) | "
             "LoRA r=8 adapter |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        sh = ModelShape.from_preset(name)
        P = sh.params
        lines.append(f"| {name} | {sh.n_layer} | {sh.n_embd} | {P:,} | {P * 4 / GIB:.2f} GiB | {P * 2 / GIB:.2f} GiB "
                     f"| {P * 16 / GIB:.2f} GiB | {_m(sh.lora_params(8))} |")
    return "\n".join(lines)


def _summary_row(title: str, plan: MemoryPlan, verdict: str) -> str:
    by_name = {p.name: f"{plan.phase_gib(p):.2f}" for p in plan.phases}
    s = plan.settings
    note = (f"micro {s.micro_batch_size}" + (f", rollout {s.rollout_batch_size}" if s.rl else "")
            + (", ckpt" if s.grad_checkpoint else "") + ("" if s.fused_logprobs else ", unfused"))
    return (f"| {plan.shape.name} {title} | {note} | {plan.resident.nbytes / GIB:.2f} | "
            f"{by_name.get('generation', '-')} | {by_name.get('scoring', '-')} | {by_name['update']} | "
            f"**{plan.peak_gib:.2f}** | {verdict} |")


def docs_section() -> str:
    """The generated part of docs/memory.md (between DOC_BEGIN and DOC_END)."""
    out = ["### Parameters", "", _preset_table(), "",
           f"### Verdicts under 16 GiB ({16 * (1 - RESERVE_FRACTION):.1f} GiB usable)", "",
           f"Sequences of {HEADLINE.prompt_len} prompt + {HEADLINE.response_len} response tokens, bf16. Peak GiB "
           "per phase, resident memory included. Each case as asked, then, when it does not fit, the plan's "
           "proposal, with and without the fused lm-head kernel.", "",
           "| case | settings | resident | generation | scoring | update | peak | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    details = []
    for title, preset, settings, budget, detailed in DOC_CASES:
        v = decide(ModelShape.from_preset(preset), settings, budget)
        fits = "fits" if v.fits else "**does not fit**" if v.proposal else "**refused**: nothing fits"
        out.append(_summary_row(title, v.plan, fits))
        if v.proposal is not None:
            out.append(_summary_row(f"{title}: proposal `{v.flags()}`", v.proposal, "fits"))
            unfused = plan_memory(v.proposal.shape, replace(v.proposal.settings, fused_logprobs=False), budget)
            out.append(_summary_row(f"{title}: the proposal without the fused lm-head", unfused,
                                    "fits" if unfused.fits else "**does not fit**"))
        if detailed:
            p = v.proposal or v.plan
            details.append((f"{p.shape.name} {title}" + (f", with `{v.flags()}`" if v.proposal else ""), p))
    for heading, p in details:
        out += ["", f"### {heading}", "", f"{p.settings.describe()}; {p.settings.layout()}.", "",
                p.table(markdown=True), "", p.summary() + "." + (f" {p.host_note()}." if p.host_bytes else "")]
    return "\n".join(out)


def render_docs(text: str) -> str:
    """`text` (docs/memory.md) with its generated section replaced by `docs_section()`."""
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"docs/memory.md lacks the markers {DOC_BEGIN!r} ... {DOC_END!r}")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    return f"{head}{DOC_BEGIN}\n{docs_section()}\n{DOC_END}{tail}"


def sync_docs(path=DOC_PATH, check: bool = False) -> bool:
    """Rewrite the generated section of docs/memory.md (`rlhf-fast plan --write-docs`); check=True only
    compares (`--check-docs`). Whether the file is, or now is, current."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = render_docs(text)
    if new == text or check:
        return new == text
    path.write_text(new, encoding="utf-8")
    return True


# --- rlhf-fast plan -------------------------------------------------------------------------------------

DEFAULT_PRESET = "gpt2-xl"


@dataclass(frozen=True)
class PlanCommand:
    """`rlhf-fast plan`: the plan of a model (a preset, or an HF directory's shape) under a memory budget, or
    docs/memory.md regenerated / checked."""

    preset: str | None = option(None, f"model preset (default: {DEFAULT_PRESET} unless --model)")
    model: str | None = option(None, "HF GPT-2 directory: the shape from its config.json (no weights are read)")
    vram: float = option(16.0, "device memory budget in GiB", metavar="GIB")
    write_docs: bool = option(False, "regenerate the numbers of docs/memory.md instead")
    check_docs: bool = option(False, "exit 1 when docs/memory.md's numbers are stale")
    settings: PlanSettings = section(PlanSettings, "the run's memory-relevant settings")

    def __post_init__(self):
        if self.preset is not None and self.model is not None:
            raise ConfigError("give --preset or --model, not both", "model")
        if self.write_docs and self.check_docs:
            raise ConfigError("give --write-docs or --check-docs, not both", "check_docs")
        if not self.vram > 0:
            raise ConfigError(f"must be > 0 GiB, got {self.vram}", "vram")

    def shape(self) -> ModelShape:
        if self.model is not None:
            try:
                return ModelShape.from_hf_dir(self.model)
            except (OSError, ValueError) as e:
                raise ConfigError(str(e), "model") from e
        try:
            return ModelShape.from_preset(self.preset or DEFAULT_PRESET)
        except ValueError as e:
            raise ConfigError(str(e), "preset") from e


def plan_command(config: PlanCommand) -> int:
    """Print the verdict: 0 when it fits or a proposal does, 2 when nothing does; --write-docs / --check-docs:
    0, or 1 when docs/memory.md is stale."""
    if config.write_docs or config.check_docs:
        if not sync_docs(DOC_PATH, check=config.check_docs):
            print(f"rlhf-fast plan: {DOC_PATH} is stale: run rlhf-fast plan --write-docs", file=sys.stderr)
            return 1
        print(f"{DOC_PATH}: {'written' if config.write_docs else 'up to date'}")
        return 0
    shape, s = config.shape(), config.settings
    if s.scored_len > shape.n_positions:  # the defaults fit gpt2 sizes, not every export: name the flags to fix
        raise ConfigError(f"prompt {s.prompt_len} + response {s.response_len}"
                          f"{' + 1 (the EOS scoring appends)' * (s.scored_len > s.seq_len)} tokens exceed the model's "
                          f"n_positions={shape.n_positions}: lower --prompt-len / --response-len",
                          "settings.prompt_len")
    verdict = decide(shape, s, config.vram)
    print(format_verdict(verdict))
    if verdict.refused:
        print(f"rlhf-fast plan: {verdict.message()}", file=sys.stderr)
        return 2
    return 0
