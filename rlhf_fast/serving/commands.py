"""`rlhf-fast generate`, `chat` and `serve`: each a config whose fields declare their flags, and a run function.

    ModelOptions      --model --device --dtype --seed            (generate, chat, serve)
    SamplingOptions   + --max-new-tokens --temperature --top-k --top-p   (generate, chat)

The CLI builds a config from the command line (`rlhf_fast.config`) and calls `<name>_command(config)`; a bad
setting is a ConfigError naming it, raised before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import option, resolve_device
from rlhf_fast.errors import ConfigError, UserError

from .batcher import BatchConfig

DTYPES = ("float32", "bfloat16", "float16")
_BATCH = BatchConfig()  # the server's batching defaults live with the batcher


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """The model to talk to and where it runs."""

    model: str = option(help="an `rlhf-fast` export (e.g. runs/demo/ppo/export) or HF GPT-2 directory, or a preset: "
                             "tiny, demo, gpt2, ... (random init: a smoke test, not meaningful text)")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    dtype: str = option("float32", "the weights' dtype on the device", choices=DTYPES)
    seed: int = option(0, "seed of a preset's random init; generate and chat also sample with it")

    def __post_init__(self):
        resolve_device(self.device)


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(ModelOptions):
    """How replies are sampled: one declaration for generate and chat."""

    max_new_tokens: int = option(64, "tokens generated per prompt / reply")
    temperature: float = option(1.0, "0 = greedy")
    top_k: int = option(0, "0 = off")
    top_p: float = option(1.0, "1.0 = off")

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ConfigError(f"must be >= 1, got {self.max_new_tokens}", "max_new_tokens")
        if not self.temperature >= 0:
            raise ConfigError(f"must be >= 0 (0 = greedy), got {self.temperature}", "temperature")
        if self.top_k < 0:
            raise ConfigError(f"must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1] (1 = off), got {self.top_p}", "top_p")

    def sampling(self):
        """The generation engine's SamplingConfig (temperature 0: greedy)."""
        from rlhf_fast.generation import SamplingConfig

        return SamplingConfig(do_sample=self.temperature > 0, temperature=self.temperature or 1.0, top_k=self.top_k,
                              top_p=self.top_p)


def _random_init(model: str) -> bool:
    from rlhf_fast.model import PRESETS

    return model in PRESETS


# --- generate -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(SamplingOptions):
    """`rlhf-fast generate`: complete a batch of prompts and print each completion."""

    prompt: tuple[str, ...] = option((), "a prompt (repeat for a batch)", append=True)
    prompts_file: str | None = option(None, "text file, one prompt per line (blank lines skipped)")
    tokenizer: str | None = option(None, "'byte' or an HF tokenizer dir (default: byte for a preset, else --model)")

    def __post_init__(self):
        super().__post_init__()
        if not self.prompt and not self.prompts_file:
            raise ConfigError("no prompts: give --prompt and/or --prompts-file", "prompt")

    def prompts(self) -> list[str]:
        """The --prompt values, then the non-blank lines of --prompts-file."""
        prompts = list(self.prompt)
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise ConfigError(f"{path}: no such file", "prompts_file")
            prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{self.prompts_file}: no prompts in it", "prompts_file")
        return prompts


def generate_command(config: GenerateConfig) -> int:
    import torch

    from rlhf_fast.data import load_tokenizer
    from rlhf_fast.generation import generate
    from rlhf_fast.model import GPT

    prompts = config.prompts()
    device = resolve_device(config.device)
    preset = _random_init(config.model)
    if preset:  # random init: a smoke test of the engine, not meaningful text
        torch.manual_seed(config.seed)
        model = GPT.from_preset(config.model)
    else:
        model = GPT.from_pretrained(config.model)
    model = model.to(device=device, dtype=getattr(torch, config.dtype)).eval()
    tok = load_tokenizer(config.tokenizer or ("byte" if preset else config.model))
    encoded = [tok.encode(p) or [tok.eos_token_id] for p in prompts]  # an empty prompt starts from EOS
    input_ids, attention_mask = tok.pad(encoded, side="left")
    sampling = config.sampling()
    out = generate(model, input_ids.to(device), attention_mask.to(device), max_new_tokens=config.max_new_tokens,
                   do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator(device).manual_seed(config.seed))
    P = input_ids.shape[1]
    for prompt, row, mask in zip(prompts, out.sequences[:, P:], out.response_mask, strict=True):
        print(f"=== {prompt}")
        print(tok.decode(row[mask.bool()].tolist()))
    return 0


# --- chat -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChatConfig(SamplingOptions):
    """`rlhf-fast chat`: a multi-turn HH-format conversation in the terminal, streamed."""

    system: str | None = option(None, "text put before the conversation")


def chat_command(config: ChatConfig) -> int:
    from .chat import ChatSession, run_repl
    from .conversation import load_chat_model

    model, tokenizer, _ = load_chat_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    session = ChatSession(model, tokenizer, sampling=config.sampling(), max_new_tokens=config.max_new_tokens,
                          system=config.system, seed=config.seed)
    name = f"{config.model} (random init: replies are noise)" if _random_init(config.model) else config.model
    return run_repl(session, name=name)


# --- serve ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServeConfig(ModelOptions):
    """`rlhf-fast serve`: the OpenAI-compatible HTTP server with dynamic batching (needs the serve extra)."""

    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "TCP port")
    max_batch_size: int = option(_BATCH.max_batch_size, "requests per generate call (1: no batching, one request "
                                                        "at a time)")
    batch_window_ms: float = option(_BATCH.batch_window_ms, "how long the oldest waiting request waits for others "
                                                            "to batch with")
    max_queue: int = option(_BATCH.max_queue, "waiting requests before the server answers 429")
    compile: bool | None = option(None, "torch.compile (inductor) the decode step before it is captured as a CUDA "
                                        "graph (default: off, it is a long compile; the CUDA graph is on for CUDA "
                                        "regardless, RLHF_FAST_NO_CUDA_GRAPH=1 turns it off)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be in [0, 65535], got {self.port}", "port")
        for key in ("max_batch_size", "batch_window_ms", "max_queue"):  # BatchConfig's own rules, one at a time
            try:
                BatchConfig(**{key: getattr(self, key)})
            except ValueError as e:
                raise ConfigError(str(e), key) from e

    def batch(self) -> BatchConfig:
        return BatchConfig(max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window_ms,
                           max_queue=self.max_queue, compile=self.compile)


def serve_command(config: ServeConfig) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serve needs fastapi and uvicorn: pip install 'rlhf_fast[serve]'") from None
    from .conversation import load_chat_model
    from .server import serve

    model, tokenizer, name = load_chat_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    serve(model, tokenizer, name, host=config.host, port=config.port, batch=config.batch())
    return 0
