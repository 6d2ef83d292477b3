"""Continuous batching over a `StreamingModel`: one engine loop owns the model, the paged KV
pool and the batch (vLLM's ``EngineCore``), and request handlers talk to it through queues
(its ``AsyncLLM``).

* :class:`EngineCore` is single-threaded. :meth:`EngineCore.step` asks the
  :class:`~runtime.scheduler.Scheduler` for the step's tokens (a token per decoding sequence,
  chunks of joining prompts), runs ONE forward pass over all of them (so each streamed layer
  is read once per step for the whole batch, see :mod:`runtime.kvbatch`), chooses each
  finishing sequence's next token (with :class:`~runtime.generate.Chooser`, as
  :func:`~runtime.generate.stream` does), detokenizes, checks stop conditions and hands each
  request its :class:`RequestOutput`. Requests join and leave between steps.
* :class:`Engine` runs the core on a thread of its own. ``submit`` checks a request (the same
  checks as every entry point), refuses it when the waiting queue is full, and queues it;
  ``cancel`` takes it out at the next step boundary, freeing its blocks. Outputs reach each
  request's sink, a callable run on the engine thread (a server's sink hands them to its
  event loop). A request that fails, or a step that fails, ends those requests with an error;
  the loop goes on.

Speculative decoding (:mod:`runtime.speculative`) is off here: a batch of decoding requests
already fills each pass over the streamed layers with its rows, which is what speculation
buys one user; drafted rows would compete with other requests' rows for the same pass.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.detok import TextStream
from runtime.generate import Chooser, InvalidRequestError, SamplingConfig, check_context, context_limit
from runtime.kv import PrefixCachingSession, kv_token_bytes
from runtime.kvbatch import forward_step, step_layout
from runtime.memory import release_free_memory
from runtime.scheduler import Scheduler, SeqState, Work

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20


class QueueFullError(RuntimeError):
    """The waiting queue is full; ``retry_after_s`` estimates when a place frees up."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits.

    Attributes:
        max_running: most sequences in the batch (default: one per KV block, i.e. what the pool allows).
        max_waiting: the waiting queue's bound; beyond it a request is refused (:class:`QueueFullError`).
        step_tokens: tokens one step computes while prompts are being prefilled (default: the
            model's prefill chunk, which the budget sized the activations for).
        itl_factor: while sequences decode, a step computes no more tokens than keep its time
            within this factor of a one-token step (the step time is fitted as ``a + b * tokens``
            over recent steps), so prompts joining the batch never stall the running streams for
            long; None: always ``step_tokens``.
        logits_chunk: most prompt tokens a step computes for a request that wants the logprobs
            of its prompt (echo): each is a vocabulary-sized row of logits, which the budget's
            activations (sized for one row per sequence) do not hold many of.
    """

    max_running: int | None = None
    max_waiting: int = 64
    step_tokens: int | None = None
    itl_factor: float | None = 2.0
    logits_chunk: int = 32

    def __post_init__(self) -> None:
        if self.itl_factor is not None and not self.itl_factor > 1:
            raise ValueError(f"itl_factor must be > 1 (or None), got {self.itl_factor}")
        for name in ("max_running", "step_tokens", "logits_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass(frozen=True)
class EngineRequest:
    """What a handler submits. ``logprobs``: alternatives returned per generated token (None:
    no logprobs); ``prompt_logprobs``: the same for the prompt's own tokens (echo)."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``top`` alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one step brought a request. ``finish_reason``: None while running, then ``stop``
    (end-of-sequence token or stop string), ``length``, ``abort`` or ``error``."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, first position None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[RequestOutput], None]


@dataclass
class EngineStats:
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    finished: int = 0
    failed_steps: int = 0
    step_seconds: float = 0.0  # mean over the last steps (exponentially weighted)
    max_batch: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StepCost:
    """A step's time as ``a + b * tokens``, fitted by least squares over recent steps (each older
    step weighs ``decay`` times less)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.s = [0.0] * 5  # sums of w, w*t, w*y, w*t*t, w*t*y

    def add(self, tokens: int, seconds: float) -> None:
        t, y = float(tokens), seconds
        self.s = [self.decay * v + d for v, d in zip(self.s, (1.0, t, y, t * t, t * y))]

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None until steps of different sizes have been seen."""
        w, st, sy, stt, sty = self.s
        den = w * stt - st * st
        if w <= 0 or den <= 1e-9 * max(w * stt, 1e-30):
            return None
        b = (w * sty - st * sy) / den
        a = (sy - b * st) / w
        return (a, b) if b > 0 and a >= 0 else None

    def tokens_within(self, factor: float) -> int | None:
        """Most tokens a step may compute to take at most ``factor`` times a one-token step."""
        ab = self.fit()
        if ab is None:
            return None
        a, b = ab
        return max(1, int((factor * (a + b) - a) / b))


@dataclass
class _Live:
    req: EngineRequest
    seq: SeqState
    sink: Sink
    chooser: Chooser
    text: TextStream
    prompt_lp: list[TokenLogprob | None] | None
    sent_prompt_lp: bool = False


class EngineCore:
    """The engine loop's state and step (single-threaded; see the module's doc).

    Args:
        model: a :class:`~runtime.executor.StreamingModel` (or anything with its forward and attributes).
        tokenizer: the model's fast tokenizer (detokenizing, stop strings).
        session: the paged KV pool with its prefix index and spill store (shared by all requests).
        config: batching limits.
    """

    def __init__(self, model, tokenizer, session: PrefixCachingSession, config: EngineConfig = EngineConfig()) -> None:
        self.model, self.tokenizer, self.session = model, tokenizer, session
        self.pool = session.pool
        self.config = config
        self.max_running = config.max_running or self.pool.num_blocks
        self.sched = Scheduler(session, max_running=self.max_running, step_tokens=config.step_tokens or model.prefill_chunk,
                               logits_chunk=config.logits_chunk)
        self.kv_tokens = self.pool.num_blocks * self.pool.block_size
        self.live: dict[str, _Live] = {}
        self.stats = EngineStats()
        self.cost = StepCost()
        self.vocab = model.config.vocab_size

    # -- requests ----------------------------------------------------------------------------
    @property
    def context_tokens(self) -> int:
        """Most tokens (prompt plus new) one request may hold."""
        return context_limit(self.model, self.kv_tokens)

    def check(self, req: EngineRequest) -> None:
        """The request's own checks (its sampling config checked itself when made).

        Raises:
            InvalidRequestError: token ids outside the vocabulary, logprobs out of range.
            ContextLengthError: prompt plus new tokens longer than the context or the KV pool.
        """
        bad = next((t for t in req.prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad!r} is outside the vocabulary (0..{self.vocab - 1})", param="prompt")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(req, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in 0..{MAX_LOGPROBS}, got {v!r}", param="logprobs")
        check_context(self.model, 1, len(req.prompt_ids), req.sampling.max_new_tokens, kv_tokens=self.kv_tokens,
                      kv_token_bytes=kv_token_bytes(self.model.config, self.model.dtype, self.pool.kv_dtype))

    def add(self, req: EngineRequest, sink: Sink) -> None:
        """Queue a checked request (see :meth:`check`)."""
        if req.request_id in self.live:
            raise InvalidRequestError(f"request id {req.request_id} is already running", param="request_id")
        seq = SeqState(req.request_id, list(req.prompt_ids), len(req.prompt_ids), req.sampling.max_new_tokens,
                       needs_prompt_logits=req.prompt_logprobs is not None)
        self.live[req.request_id] = _Live(req, seq, sink, Chooser(req.sampling), TextStream(self.tokenizer, list(req.stop)),
                                          [None] * len(req.prompt_ids) if req.prompt_logprobs is not None else None)
        self.sched.add(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its blocks are freed now, its sink told ``abort``."""
        lv = self.live.get(request_id)
        if lv is not None:
            self._finish(lv, RequestOutput(request_id), "abort")

    def fail_all(self, message: str) -> None:
        """End every request with an error (after a failure of the loop itself)."""
        for lv in list(self.live.values()):
            try:
                self._finish(lv, RequestOutput(lv.req.request_id), "error", error=message)
            except Exception:  # the bookkeeping itself is broken: start the batch afresh
                logger.exception("could not end request %s cleanly", lv.req.request_id)
                self.live.pop(lv.req.request_id, None)
                self._send(lv, RequestOutput(lv.req.request_id, finish_reason="error", error=message))
        if not self.live and self.sched.has_work:
            self.sched = Scheduler(self.session, max_running=self.max_running, step_tokens=self.sched.step_tokens,
                                   logits_chunk=self.config.logits_chunk)

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.sched.waiting)

    @property
    def num_running(self) -> int:
        return len(self.sched.running)

    def retry_after_s(self) -> int:
        """Seconds until a running request is likely to finish (its tokens left times the step time)."""
        left = [s.max_new_tokens - s.num_generated + s.remaining for s in self.sched.running]
        return max(1, math.ceil(min(left, default=1) * max(self.stats.step_seconds, 0.01)))

    # -- a step ------------------------------------------------------------------------------
    def step(self) -> int:
        """Run one batched step; returns the tokens it computed (0: nothing to do)."""
        cap = self.cost.tokens_within(self.config.itl_factor) if self.config.itl_factor else None
        work = self.sched.schedule(cap)
        if not work:
            return 0
        t0 = time.perf_counter()
        ids, keep, rows = [], [], []  # rows: (work, first kept row, kept positions' first index in the chunk)
        t = 0
        for w in work:
            seq = w.seq
            ids.extend(seq.tokens[seq.computed : seq.computed + w.n])
            if seq.needs_prompt_logits:
                rows.append((w, len(keep)))
                keep.extend(range(t, t + w.n))
            elif w.samples:
                rows.append((w, len(keep)))
                keep.append(t + w.n - 1)
            t += w.n
        try:
            layout = step_layout(self.pool, [w.slice() for w in work], self.model.dtype)
            logits = forward_step(self.model, self.pool, layout, torch.tensor(ids), torch.tensor(keep or [t - 1]))
        except Exception as e:  # the step's requests end with the error; the loop and the others go on
            logger.exception("a batched step of %d sequences failed", len(work))
            self.stats.failed_steps += 1
            for w in work:
                lv = self.live.get(w.seq.request_id)
                if lv is not None:
                    self._finish(lv, RequestOutput(lv.req.request_id), "error", error=f"{type(e).__name__}: {e}")
            return t
        self.sched.advance(work)
        for w, r0 in rows:
            lv = self.live.get(w.seq.request_id)
            if lv is None:
                continue
            try:
                self._after_forward(lv, w, logits, r0)
            except Exception as e:  # one request's sampling failed: that request ends, the batch goes on
                logger.exception("request %s failed after its step", lv.req.request_id)
                self._finish(lv, RequestOutput(lv.req.request_id), "error", error=f"{type(e).__name__}: {e}")
        dt = time.perf_counter() - t0
        self.cost.add(t, dt)
        st = self.stats
        st.steps += 1
        st.step_seconds = dt if st.steps == 1 else 0.8 * st.step_seconds + 0.2 * dt
        decode = sum(1 for w in work if w.start >= w.seq.num_prompt)  # feeding back a generated token
        st.decode_tokens += decode
        st.prefill_tokens += t - decode
        st.max_batch = max(st.max_batch, len(work))
        return t

    def _after_forward(self, lv: _Live, w: Work, logits: torch.Tensor, r0: int) -> None:
        seq = lv.seq
        start = w.start  # the chunk's first position
        if lv.prompt_lp is not None:
            lp = torch.log_softmax(logits[r0 : r0 + w.n], dim=-1)  # [n, vocab]
            for k in range(w.n):
                p = start + k
                if p + 1 < seq.num_prompt:
                    lv.prompt_lp[p + 1] = _token_logprob(lp[k], seq.tokens[p + 1], lv.req.prompt_logprobs)
        if not w.samples:
            return
        out = RequestOutput(lv.req.request_id)
        if lv.prompt_lp is not None and not lv.sent_prompt_lp:
            out.prompt_logprobs, lv.sent_prompt_lp = lv.prompt_lp, True
        if seq.max_new_tokens == 0:  # echo only: the prompt's logprobs, nothing generated
            self._finish(lv, out, "length")
            return
        row = logits[r0 + (w.n - 1 if seq.needs_prompt_logits else 0)]
        seen = torch.tensor([seq.tokens])
        tok = int(lv.chooser(seen, row[None])[0])
        if lv.req.logprobs is not None:
            out.logprobs = [_token_logprob(torch.log_softmax(row, dim=-1), tok, lv.req.logprobs)]
        seq.tokens.append(tok)
        out.token_ids = [tok]
        out.text = lv.text.push(tok)
        if tok in lv.req.sampling.stop_token_ids or lv.text.stopped:
            self._finish(lv, out, "stop")
        elif seq.num_generated >= seq.max_new_tokens:
            self._finish(lv, out, "length")
        else:
            self._send(lv, out)

    def _finish(self, lv: _Live, out: RequestOutput, reason: str, error: str | None = None) -> None:
        seq = lv.seq
        if reason in ("stop", "length"):
            out.text += lv.text.finish(seq.tokens[seq.num_prompt :])
        out.finish_reason, out.error = reason, error
        self.sched.remove(seq)
        del self.live[lv.req.request_id]
        self.stats.finished += 1
        self._send(lv, out)

    def _send(self, lv: _Live, out: RequestOutput) -> None:
        seq = lv.seq
        out.prompt_tokens, out.completion_tokens, out.cached_tokens = seq.num_prompt, seq.num_generated, seq.cached_tokens
        try:
            lv.sink(out)
        except Exception:  # a handler's sink never stops the loop
            logger.exception("the sink of request %s failed", lv.req.request_id)


def _token_logprob(lp: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """``lp``: log-probabilities ``[vocab]``."""
    alts = ()
    if top:
        v, i = torch.topk(lp, top)
        alts = tuple(zip(i.tolist(), v.tolist()))
    return TokenLogprob(token, float(lp[token]), alts)


class Engine:
    """An :class:`EngineCore` on its own thread, fed through a queue (see the module's doc).

    Thread-safe: ``submit``, ``cancel``, ``drain`` and ``shutdown`` may be called from any thread.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="sli-engine", daemon=True)
        self._started = False

    def start(self) -> "Engine":
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, req: EngineRequest, sink: Sink) -> None:
        """Check and queue a request; its outputs will reach ``sink`` (on the engine thread).

        Raises:
            InvalidRequestError: the request's checks (:meth:`EngineCore.check`).
            QueueFullError: ``max_waiting`` requests are already waiting.
            EngineClosedError: the engine is shutting down.
        """
        self.core.check(req)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            waiting = self._inbox.qsize() + self.core.num_waiting
            if waiting >= self.core.config.max_waiting:
                raise QueueFullError(
                    f"{waiting} requests are waiting (the queue holds {self.core.config.max_waiting}) behind "
                    f"{self.core.num_running} running; retry later", self.core.retry_after_s())
            self._inbox.put(("add", req, sink))

    def cancel(self, request_id: str) -> None:
        """Take a request out at the next step boundary (its blocks freed; its sink told ``abort``)."""
        self._inbox.put(("abort", request_id, None))

    def drain(self) -> None:
        """Take no new requests; those queued and running go on."""
        with self._lock:
            self._closing = True

    def idle(self) -> bool:
        return not self.core.has_work and self._inbox.empty()

    def shutdown(self, timeout_s: float = 0.0) -> bool:
        """Drain, wait up to ``timeout_s`` for the requests in flight, cancel the rest, stop the
        thread. Returns True when nothing had to be cancelled."""
        self.drain()
        deadline = time.monotonic() + timeout_s
        while self._started and self.alive and not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        clean = self.idle()
        self._inbox.put(("stop", None, None))
        if self._started:
            self._thread.join()
        return clean

    def _loop(self) -> None:
        core = self.core
        while True:
            try:  # idle: sleep until a command comes; busy: take what is there and step
                cmd = self._inbox.get_nowait() if core.has_work else self._inbox.get()
            except queue.Empty:
                cmd = None
            stop = False
            while cmd is not None:
                kind, arg, sink = cmd
                if kind == "add":
                    try:
                        core.add(arg, sink)
                    except Exception as e:  # noqa: BLE001 - a bad request ends alone
                        sink(RequestOutput(arg.request_id, finish_reason="error", error=str(e)))
                elif kind == "abort":
                    core.abort(arg)
                else:
                    stop = True
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if stop:
                self._abort_all()
                return
            if not core.has_work:
                release_free_memory()  # idle: hand the heap's free pages back
                continue
            try:
                core.step()
            except Exception:  # a bug in the loop itself: end what it holds, keep serving
                logger.exception("the engine step failed; ending the requests it held")
                core.fail_all("internal error in the engine step")

    def _abort_all(self) -> None:
        for rid in list(self.core.live):
            self.core.abort(rid)
