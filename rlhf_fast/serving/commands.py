"""`rlhf-fast generate`, `chat` and `serve`: each a config whose fields declare their flags, and a run function.

    ModelOptions      --model --device --dtype --seed            (generate, chat, serve)
    SamplingOptions   + --max-new-tokens --temperature --top-k --top-p   (generate, chat)

The CLI builds a config from the command line (`rlhf_fast.config`) and calls `<name>_command(config)`; a bad
setting is a ConfigError naming it, raised before any model is loaded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import option, resolve_device
from rlhf_fast.errors import ConfigError, UserError

from .batcher import BatchConfig
from .guard import API_KEY_ENV, ServerLimits

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_BATCH = BatchConfig()  # the server's batching defaults live with the batcher
_LIMITS = ServerLimits()  # and its request limits with the guard


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
    served_model_name: str | None = option(None, "the model id of /v1/models and of requests' `model` (default: "
                                                 "the run directory's name for a run's export, a preset's name, "
                                                 "else the HF config's _name_or_path or the directory's name)")
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on every /v1/* route (default: "
                                       f"${API_KEY_ENV}; unset: no key; /health and the chat page stay open)")
    max_body_bytes: int = option(_LIMITS.max_body_bytes, "request bodies over this many bytes get 413")
    max_streams: int = option(_LIMITS.max_streams, "streaming answers open at once before 429")
    max_streams_per_client: int = option(_LIMITS.max_streams_per_client, "streaming answers open at once from "
                                                                          "one client address before 429")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be in [0, 65535], got {self.port}", "port")
        for key in ("max_batch_size", "batch_window_ms", "max_queue"):  # BatchConfig's own rules, one at a time
            try:
                BatchConfig(**{key: getattr(self, key)})
            except ValueError as e:
                raise ConfigError(str(e), key) from e
        for key in ("api_key", "max_body_bytes", "max_streams", "max_streams_per_client"):
            try:
                ServerLimits(**{key: getattr(self, key)})
            except ValueError as e:
                raise ConfigError(str(e), key) from e
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("must not be empty", "served_model_name")

    def batch(self) -> BatchConfig:
        return BatchConfig(max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window_ms,
                           max_queue=self.max_queue, compile=self.compile)

    def limits(self) -> ServerLimits:
        """The guard's settings; the key from --api-key, else $RLHF_FAST_API_KEY (unset or empty: none)."""
        return ServerLimits(api_key=self.api_key or os.environ.get(API_KEY_ENV) or None,
                            max_body_bytes=self.max_body_bytes, max_streams=self.max_streams,
                            max_streams_per_client=self.max_streams_per_client)


def served_model_name(model: str) -> str:
    """The default model id for `--model`: a preset's name; for `<run>/export` beside the run's config.json, the
    run directory's name (`runs/demo/ppo/export` -> "ppo": every export is called "export"); for another
    directory, its HF config's `_name_or_path` when that names a model rather than a local path, else the
    directory's name."""
    if _random_init(model):
        return model
    directory = Path(model).resolve()
    run_config = directory.parent / "config.json"
    if directory.name == "export" and run_config.is_file() and "stage" in _json_object(run_config):
        return directory.parent.name
    name = _json_object(directory / "config.json").get("_name_or_path")
    if isinstance(name, str) and name.strip() and not Path(name).is_absolute() and not Path(name).exists():
        return name.strip()
    return directory.name


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: no name from it (loading the model reports real faults)
        return {}
    return value if isinstance(value, dict) else {}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve_command(config: ServeConfig) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serve needs fastapi and uvicorn: pip install 'rlhf_fast[serve]'") from None
    from .conversation import load_chat_model
    from .server import serve

    limits = config.limits()
    if limits.api_key is None and not _is_loopback(config.host):
        log.warning("serving on %s without an API key: anyone who reaches this address can generate; give --api-key "
                    "or $%s", config.host, API_KEY_ENV)
    model, tokenizer, _ = load_chat_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    name = config.served_model_name or served_model_name(config.model)
    serve(model, tokenizer, name, host=config.host, port=config.port, batch=config.batch(), limits=limits)
    return 0
