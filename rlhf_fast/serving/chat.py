"""`rlhf-fast chat`: a multi-turn conversation with a model in the terminal, streamed token by token.

The conversation is HH-RLHF text (conversation.py): [system] "\\n\\nHuman: ...\\n\\nAssistant:" reply, turn after
turn. It lives in one static KV cache (batch 1, the model's whole context) and is not re-encoded while it fits:

- the first turn is prefilled (slots 0..P-1), the reply decodes one token per step (the generation engine's
  `DecodeEngine` over this cache: a CUDA graph replay per token on CUDA);
- a later turn appends only its new tokens, in one forward. `GPT.hidden_states` decodes one token per call,
  so `_extend` runs the blocks itself with each layer's cache seen through a window that ends at the new
  turn's last slot: keys are slots 0..end-1, queries the last T of them, and the attention backends' bottom-right
  causal alignment (query i sees keys <= i + Tk - Tq) is then exactly "each new token sees the conversation
  and the new tokens before it";
- when the conversation plus a full reply would overflow n_positions, the oldest turns are dropped (a notice
  says so) and what is left is prefilled once.

The cache holds the tokens the model produced for its replies, not a re-tokenisation of their text: with the
byte tokenizer that is byte for byte the transcript; with GPT-2 BPE a token pair at a turn boundary can differ
from a fresh encoding of the transcript (the model sees what it actually said).

Streaming: a reply's text is re-decoded as it grows and the new end printed, holding back a trailing
incomplete UTF-8 character ("\\ufffd" until its last byte arrives) and anything that may be the start of a
turn marker. A reply ends at EOS, at max_new_tokens, or where the model starts a new turn (the marker is cut).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator

import torch

from rlhf_fast.generation import DecodeEngine, DecodeSpec, SamplingConfig, prefill
from rlhf_fast.generation.generate import cache_dtype
from rlhf_fast.model.kv_cache import KVCache

from .conversation import ASSISTANT, HUMAN, TextStream, hh_prompt

COMMANDS = "/reset starts a new conversation, /exit quits"


class _CacheWindow:
    """A layer's cache as attention sees it during `_extend`: writes go to the new turn's slots, reads return
    slots 0..end-1 (the conversation so far and the new turn), so that Tk - Tq is the new turn's first slot."""

    def __init__(self, layer, end: int):
        self.layer, self.end = layer, end

    def update(self, k, v, input_pos):
        self.layer.update(k, v, input_pos)  # (B, H, T, D) into slots input_pos (T,)
        return self.layer.k[:, :, :self.end], self.layer.v[:, :, :self.end]  # (B, H, end, D)


class ChatReply:
    """One streamed reply: iterate for its text pieces. `notice` (known before streaming) says what was dropped
    to fit the context; `text` (the pieces so far) and `stop` ("eos", "turn", "length") fill in as it streams,
    `token_ids` (what the conversation keeps of it) when it ends."""

    def __init__(self, notice: str | None):
        self.notice = notice
        self.text = ""
        self.stop: str | None = None
        self.token_ids: list[int] = []
        self._pieces: Generator[str, None, None] | None = None  # set by ChatSession.reply

    def __iter__(self) -> ChatReply:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop streaming; what was generated so far stays in the conversation."""
        self._pieces.close()


class ChatSession:
    """A conversation with `model` over its own KV cache. `reply(text)` streams the answer; `reset()` starts over.

    sampling: greedy by default; max_new_tokens: per reply (that much room is kept free in the context);
    system: plain text put before the first turn; seed: the sampling generator's; cuda_graph, compile: as for
    `generate` (the decode step as a CUDA graph, by default on CUDA; inductor on the model step, opt-in).
    """

    def __init__(self, model, tokenizer, *, sampling: SamplingConfig | None = None, max_new_tokens: int = 64,
                 system: str | None = None, seed: int = 0, cuda_graph: bool | None = None, compile: bool = False):
        n_positions = model.config.n_positions
        overhead = len(tokenizer.encode(HUMAN + ASSISTANT)) + 1  # the smallest turn: markers and one token
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if max_new_tokens > n_positions - overhead:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a message in the model's "
                             f"{n_positions}-token context; use at most {n_positions - overhead}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingConfig(do_sample=False)
        self.max_new_tokens = max_new_tokens
        self.device = model.transformer.wte.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # Its own cache, not generate()'s shared one (`kv_cache_for`): another generate call must not clobber it.
        self._cache = KVCache.for_model(model.config, 1, n_positions, cache_dtype(model, self.device), self.device)
        # EOS and turn markers are checked here, per token: the engine only decodes and samples
        self._engine = DecodeEngine(self._cache, DecodeSpec(self.sampling))
        self.cuda_graph, self.compile = cuda_graph, compile
        self._system_text = system.strip() if system else ""
        self._open: ChatReply | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system text stays)."""
        if self._open is not None:
            self._open.close()
            self._open = None
        self._system = self.tokenizer.encode(self._system_text) if self._system_text else []
        self._turns: list[list[int]] = []  # per exchange: "\n\nHuman: ...\n\nAssistant:" + the reply's tokens
        self._cached = 0  # the conversation's first _cached tokens are in cache slots 0.._cached-1
        self.messages: list[dict] = [{"role": "system", "content": self._system_text}] if self._system else []

    def context_ids(self) -> list[int]:
        """The conversation as the model sees it: system text, then every turn with its reply."""
        return self._system + [t for turn in self._turns for t in turn]

    def reply(self, text: str) -> ChatReply:
        """The model's answer to the user's `text`, streamed as the returned ChatReply is iterated. A reply
        that is still streaming is closed first (what it produced so far stays in the conversation)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a message must be non-empty text")
        if self._open is not None:
            self._open.close()
        prompt = self.tokenizer.encode(hh_prompt([{"role": "user", "content": text}]))
        prompt, notice = self._make_room(prompt)
        reply = ChatReply(notice)
        reply._pieces = self._stream(prompt, text.strip(), reply)
        self._open = reply
        return reply

    # --- context budget -------------------------------------------------------------------------------------

    def _make_room(self, prompt: list[int]) -> tuple[list[int], str | None]:
        """Drop the oldest turns (then the system text, then the start of the message itself) until the
        conversation, this prompt and a full reply fit in the context; the prompt and a notice, or None."""
        n_positions = self.model.config.n_positions
        budget = n_positions - self.max_new_tokens
        if len(self.context_ids()) + len(prompt) <= budget:
            return prompt, None
        parts, n = [], 0
        while self._turns and len(self.context_ids()) + len(prompt) > budget:
            self._turns.pop(0)
            first = 1 if self._system else 0
            del self.messages[first:first + 2]  # the turn's user and assistant messages
            n += 1
        if n:
            parts.append("dropped the oldest turn" if n == 1 else f"dropped the {n} oldest turns")
        if self._system and len(self.context_ids()) + len(prompt) > budget:
            self._system, self.messages = [], self.messages[1:]
            parts.append("dropped the system text")
        if len(prompt) > budget:
            prompt = prompt[len(prompt) - budget:]  # keeps the "\n\nAssistant:" that the reply follows
            parts.append(f"kept the last {budget} tokens of your message")
        self._cached = 0  # the conversation has shifted: prefill it again
        return prompt, (f"context full ({n_positions} tokens, {self.max_new_tokens} kept for the reply): "
                        + ", ".join(parts))

    # --- the decode loop ------------------------------------------------------------------------------------

    def _stream(self, prompt: list[int], user_text: str, reply: ChatReply) -> Generator[str, None, None]:
        start = len(self.context_ids())
        reply_ids: list[int] = []
        keep = None  # reply tokens kept (None: all of them)
        engine = self._engine
        try:
            if engine.prepare(self.model, cuda_graph=self.cuda_graph, compile=self.compile):
                self._cached = 0  # its warm-up steps went through the cache: encode the conversation again
            logits = self._feed(self.context_ids()[self._cached:] + prompt)
            slot = torch.full((1, 1), self._cached, dtype=torch.long, device=self.device)  # position = slot
            engine.start(logits[None], slot, self._cached, self.generator)
            stream = TextStream(self.tokenizer, stop_at_turn=True)  # holds back what may start a turn marker
            for step in range(self.max_new_tokens):
                if step:  # the previous token into slot _cached, the next one sampled (the last is fed next turn)
                    engine.step(self.model)
                    self._cached += 1
                token = int(engine.token)
                if token == self.tokenizer.eos_token_id:
                    reply.stop = "eos"
                    break
                reply_ids.append(token)
                piece = stream.add(token)
                if piece:
                    reply.text += piece
                    yield piece
                if stream.stopped:  # the model began a new turn: the reply ends before the marker
                    reply.stop = "turn"
                    keep = self._tokens_before(reply_ids, len(reply.text))
                    break
            else:
                reply.stop = "length"
            rest = stream.flush()
            if rest:
                reply.text += rest
                yield rest
        finally:
            engine.finish()
            reply.token_ids = reply_ids[:keep]
            self._commit(start, prompt, reply.token_ids, user_text, reply.text)

    def _tokens_before(self, reply_ids: list[int], cut: int) -> int:
        """How many of the reply's tokens lie wholly before character `cut` of its text."""
        k = len(reply_ids)
        while k and len(self.tokenizer.decode(reply_ids[:k])) > cut:
            k -= 1
        return k

    def _commit(self, start: int, prompt: list[int], reply_ids: list[int], user_text: str, reply_text: str):
        """Record the turn; the cache keeps only the slots that hold it (a cut turn marker is rolled back)."""
        self._turns.append(prompt + reply_ids)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply_text}]
        self._cached = min(self._cached, start + len(prompt) + len(reply_ids))
        self._cache.valid[:, self._cached:] = False  # a decode step attends over every valid slot
        self._open = None

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Write ids into the cache after the first _cached tokens; logits (V,) of the next token."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        logits = prefill(self.model, x, None, self._cache)[0] if self._cached == 0 else self._extend(x)
        self._cached += len(ids)
        return logits

    def _extend(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, T) into slots _cached.._cached+T-1 in one forward (see the module docstring); logits (V,).
        GPT.hidden_states with a cache, minus its T == 1 limit on a step at input_pos."""
        start, end = self._cached, self._cached + x.shape[1]
        positions = torch.arange(start, end, device=self.device)  # (T,) cache slots = positions (batch 1)
        self._cache.valid[:, start:end] = True
        key_padding_mask = self._cache.valid[:, :end]  # (1, end)
        tr = self.model.transformer
        h = tr.drop(tr.wte(x) + tr.wpe(positions)[None])  # (1, T, C)
        for block, layer in zip(tr.h, self._cache.layers, strict=True):
            h = block(h, key_padding_mask, _CacheWindow(layer, end), positions)
        return self.model.lm_head(tr.ln_f(h[:, -1]))[0]


def run_repl(session: ChatSession, *, name: str = "the model", input_fn: Callable[[str], str] = input,
             output=None) -> int:
    """The terminal chat over `session`: /reset, /exit; EOF or Ctrl-C at the prompt quits, Ctrl-C during a
    reply stops that reply. Returns the exit code (0)."""
    output = output or sys.stdout
    n_positions = session.model.config.n_positions
    output.write(f"chatting with {name} ({n_positions}-token context, replies up to {session.max_new_tokens} "
                 f"tokens); {COMMANDS}\n")
    while True:
        try:
            line = input_fn("you: ").strip()
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/") and " " not in line:
            if line == "/exit":
                return 0
            if line == "/reset":
                session.reset()
                output.write("[new conversation]\n")
            else:
                output.write(f"[unknown command {line}: {COMMANDS}]\n")
            continue
        reply = session.reply(line)
        if reply.notice:
            output.write(f"[{reply.notice}]\n")
        output.write("model: ")
        output.flush()
        started = False  # the reply's leading space is the HH format's, not worth printing
        try:
            for piece in reply:
                piece = piece if started else piece.lstrip()
                started = started or bool(piece)
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            reply.close()
            output.write(" [stopped]")
        output.write("\n" if started or reply.stop is None else "[no reply]\n")
        output.flush()
