"""Dynamic batching for the HTTP server: requests that arrive close together and share sampling settings run
as one left-padded `generate` call in one worker thread (the model is not thread-safe), and every request
streams its own text back to the asyncio handler awaiting it.

- Grouping: the oldest waiting request opens a batch. It closes once max_batch_size compatible requests wait,
  or batch_window_ms after that oldest request arrived or the previous call ended, whichever is later (so
  the clients a call just answered can resubmit and join the requests that queued during it).
  Compatible = same sampling settings (all greedy requests are one group) and the batch's widest prompt +
  longest max_tokens fits the context. The others wait for a later batch, in arrival order.
- A call runs to its longest max_tokens; each request ends at its own max_tokens, EOS, stop string or turn
  marker, and `generate` stops early (its `on_step` hook) once every request is finished or its client gone.
- Batch sizes are padded up to a power of two with one-token dummy rows (at most max_batch_size), so a server
  meets few distinct shapes: each is a KV cache kept by the engine and, on CUDA, a captured decode graph.
- Seeds: the `torch.Generator` belongs to a whole call, so a request with a seed runs alone (a batch of one),
  which makes it reproducible; unseeded sampling draws from torch's global generator.
- Backpressure: at most max_queue requests wait (running ones do not count); beyond that `submit` raises
  QueueFull, which the server answers with 429.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from rlhf_fast.generation import generate

from .conversation import TextStream

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 8  # requests per generate call; 1 = no batching
    batch_window_ms: float = 5.0  # how long the oldest waiting request waits for company
    max_queue: int = 64  # waiting requests before 429
    compile: bool | None = None  # inductor on the decode step (True; None/False: off). CUDA graphs are on for CUDA

    def __post_init__(self):
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be an int >= 1, got {self.max_batch_size!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"--batch-window-ms must be >= 0, got {self.batch_window_ms!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"--max-queue must be an int >= 1, got {self.max_queue!r}")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):  # messages start with the request field they name
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature: must be in [0, 2] (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")

    def group(self) -> tuple | None:
        """Requests with equal groups may share a generate call; None = must run alone (seeded)."""
        if self.seed is not None:
            return None
        return ("greedy",) if self.temperature == 0 else (self.temperature, self.top_p, self.top_k)

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()  # the reply ends before the first of these (not included)
    stop_at_turn: bool = False  # chat: the reply also ends where the model starts a new dialogue turn
    strip_leading: bool = False  # chat: drop the whitespace the reply starts with ("Assistant: Hi")


class QueueFull(Exception):
    pass


class GenerationError(Exception):
    pass


class Completion:
    """A submitted request. `async for piece in completion` yields its text as it is generated; after the
    last piece, finish_reason ("stop" or "length"), completion_tokens and batch_size (requests in the generate
    call it ran in) are set. cancel() (client gone) takes it out of the queue, or out of delivery in a running
    batch, freeing its slot. Create through Batcher.submit, from the event loop that will read it."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, on_cancel):
        self.request = request
        self.cancelled = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.batch_size = 0
        self.arrived = time.monotonic()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            self._on_cancel(self)

    async def __aiter__(self):
        while True:
            kind, value = await self._events.get()
            if kind == "text":
                yield value
            elif kind == "done":
                self.finish_reason, self.completion_tokens, self.batch_size = value
                return
            else:
                raise GenerationError(value)

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def _put(self, kind: str, value) -> None:  # worker thread -> the loop's queue
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _Slot:
    """A request's row in a running generate call (worker thread only)."""

    def __init__(self, completion: Completion, tokenizer, batch_size: int):
        self.completion = completion
        self.request = completion.request
        self.eos = tokenizer.eos_token_id
        self.stream = TextStream(tokenizer, self.request.stop, self.request.stop_at_turn)
        self.batch_size = batch_size
        self.n_tokens = 0
        self.done = False
        self._started = not self.request.strip_leading

    def step(self, token_id: int) -> None:
        if self.completion.cancelled:
            self.done = True
            return
        self.n_tokens += 1
        if token_id == self.eos:
            self.finish("stop")
            return
        self._emit(self.stream.add(token_id))
        if self.stream.stopped:
            self.finish("stop")
        elif self.n_tokens >= self.request.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self._emit(self.stream.flush())
        self.done = True
        self.completion._put("done", (reason, self.n_tokens, self.batch_size))

    def _emit(self, piece: str) -> None:
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        if piece:
            self.completion._put("text", piece)


class Batcher:
    """Queue + worker thread running batched `generate` calls. start() / close() around its use; submit()
    from coroutines; stats() from anywhere."""

    def __init__(self, model, tokenizer, config: BatchConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or BatchConfig()
        self.n_positions = model.config.n_positions
        self.device = model.transformer.wte.weight.device
        self._cond = threading.Condition()
        self._pending: deque[Completion] = deque()
        self._running = 0  # requests of the current call still being delivered
        self._busy = False
        self._last_done = 0.0  # time.monotonic() when the last generate call ended
        self._batch_sizes: Counter = Counter()  # requests per generate call -> calls
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the asyncio side

    def submit(self, request: Request) -> Completion:
        """Queue a request (call from a coroutine); raises QueueFull or ValueError (a request no batch fits)."""
        if not request.prompt_ids or request.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        if len(request.prompt_ids) + request.max_tokens > self.n_positions:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                             f"exceeds the model's context of {self.n_positions} tokens")
        completion = Completion(request, asyncio.get_running_loop(), self._cancel)
        with self._cond:
            if self._closing:
                raise GenerationError("the server is shutting down")
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max-queue {self.config.max_queue})")
            self._pending.append(completion)
            self._cond.notify()
        return completion

    def _cancel(self, completion: Completion) -> None:
        with self._cond:
            if completion in self._pending:
                self._pending.remove(completion)
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return dict(queued=len(self._pending), running=self._running, busy=self._busy,
                        batches=sum(self._batch_sizes.values()),
                        requests=sum(size * n for size, n in self._batch_sizes.items()),
                        batch_sizes={str(size): n for size, n in sorted(self._batch_sizes.items())},
                        max_batch_size=self.config.max_batch_size, batch_window_ms=self.config.batch_window_ms,
                        max_queue=self.config.max_queue)

    # -- the worker thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="rlhf-fast-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker: waiting requests fail, a running call stops at its next step."""
        with self._cond:
            self._closing = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify()
        for completion in pending:
            completion._put("error", "the server is shutting down")
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # e.g. out of memory: fail this batch, keep serving
                log.exception("generate failed for a batch of %d", len(batch))
                for completion in batch:
                    completion._put("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._running, self._busy = 0, False
                    self._last_done = time.monotonic()

    def _next_batch(self) -> list[Completion] | None:
        window = self.config.batch_window_ms / 1000
        with self._cond:
            while not self._closing:
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                batch = self._compatible(head)
                # The window opens when the head arrived or the previous call ended, whichever is later:
                # the clients that call just answered get to resubmit and join, so groups of clients that
                # started apart merge instead of alternating in half-size batches forever.
                wait = max(head.arrived, self._last_done) + window - time.monotonic()
                if len(batch) < self.config.max_batch_size and head.request.sampling.group() is not None \
                        and wait > 0:
                    self._cond.wait(wait)
                    continue
                for completion in batch:
                    self._pending.remove(completion)
                self._running, self._busy = len(batch), True
                self._batch_sizes[len(batch)] += 1
                return batch
        return None

    def _compatible(self, head: Completion) -> list[Completion]:
        """head + the waiting requests that may join it, in arrival order, up to max_batch_size."""
        group = head.request.sampling.group()
        batch, width, new = [head], len(head.request.prompt_ids), head.request.max_tokens
        for other in self._pending:
            if len(batch) == self.config.max_batch_size or group is None:
                break
            r = other.request
            if other is head or r.sampling.group() != group:
                continue
            if max(width, len(r.prompt_ids)) + max(new, r.max_tokens) <= self.n_positions:
                batch.append(other)
                width, new = max(width, len(r.prompt_ids)), max(new, r.max_tokens)
        return batch

    def _padded_size(self, n: int) -> int:
        return min(1 << (n - 1).bit_length(), self.config.max_batch_size)

    @torch.no_grad()
    def _run(self, batch: list[Completion]) -> None:
        tok = self.tokenizer
        slots = [_Slot(c, tok, len(batch)) for c in batch]
        rows = [c.request.prompt_ids for c in batch]
        rows += [[tok.eos_token_id]] * (self._padded_size(len(rows)) - len(rows))  # dummy rows: fewer shapes
        input_ids, attention_mask = tok.pad(rows, side="left")
        sampling = batch[0].request.sampling
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(sampling.seed)

        def on_step(t, token, finished) -> bool:
            for slot, token_id in zip(slots, token[: len(slots)].tolist()):
                if not slot.done:
                    slot.step(token_id)
            active = sum(not slot.done for slot in slots)
            with self._cond:
                self._running = active
            return active == 0 or self._closing

        generate(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                 max_new_tokens=max(c.request.max_tokens for c in batch), eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, generator=generator, compile=self.config.compile,
                 on_step=on_step, **sampling.generate_kwargs())
        for slot in slots:  # only when close() cut the call short: every row otherwise ends in on_step
            if not slot.done:
                slot.completion._put("error", "the server is shutting down")
