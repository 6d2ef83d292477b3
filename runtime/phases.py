"""The pieces every decoding loop shares: request checks and their errors, the sampling config
and its chooser, typed steps and stats, and the named phases `prefill` and `decode_step`.

`runtime.generate` (plain decoding: `stream`, `generate`) and `runtime.speculative` (several
tokens per pass) both build on this module; it imports neither of them.
Sampling uses transformers' own logits processors (repetition penalty, temperature,
top-k, top-p); greedy decoding is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from runtime.executor import StreamingModel


class InvalidRequestError(ValueError):
    """A caller's parameter is out of range or of the wrong type. ``param`` names it (the
    server's error body carries it), ``code`` is a machine-readable kind."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthError(InvalidRequestError):
    """The prompt plus the tokens asked for do not fit the context (the model's, or the KV the budget reserved)."""

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
        super().__init__(message, param="max_tokens" if prompt_tokens < limit else "prompt", code="context_length_exceeded")
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit


def _number(name: str, v, *, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise InvalidRequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", param=name)
    if not integer and not math.isfinite(v):
        raise InvalidRequestError(f"{name} must be finite, got {v!r}", param=name)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``do_sample=False`` is greedy and ignores the rest (which
    is still checked). Every entry point (``generate``, ``stream``, the CLI, the server) builds
    one of these, so the same checks guard them all.

    Raises:
        InvalidRequestError: a field out of range or of the wrong type, naming it and its allowed range.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _number("max_new_tokens", self.max_new_tokens, integer=True)
        if self.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}", param="max_tokens")
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", param="temperature")
        if self.do_sample and self.temperature == 0:
            raise InvalidRequestError("temperature must be > 0 when sampling (0 = greedy: do_sample=False)", param="temperature")
        _number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}", param="top_k")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty")
        if self.seed is not None:
            _number("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2**63:
                raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}", param="seed")

    @classmethod
    def create(cls, *, max_new_tokens: int, temperature: float = 0.0, **kwargs) -> "SamplingConfig":
        """The OpenAI convention: ``temperature`` 0 is greedy, above 0 samples at that temperature."""
        _number("temperature", temperature)
        return cls(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature, **kwargs)


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: ``None``, a string, or a list of non-empty strings.

    Raises:
        InvalidRequestError: anything else.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if any(not s for s in stop):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return tuple(stop)


@dataclass(frozen=True)
class Step:
    """One generated token per sequence of the batch (``token_ids[b]``)."""

    token_ids: tuple[int, ...]
    index: int  # 0 for the first new token

    @property
    def token_id(self) -> int:
        return self.token_ids[0]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # summed over the batch
    new_tokens: int = 0  # summed over the batch
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0  # new tokens per second after the first, summed over the batch
    bytes_read_per_token: float = 0.0  # cache bytes read per decode step
    prefetch_hit_rate: float = 0.0
    hidden_io_fraction: float = 0.0
    peak_rss_bytes: int = 0  # anonymous RSS over the start, sampled at token boundaries (benchmarks sample every few ms)
    cached_tokens: int = 0  # prompt tokens whose KV was reused (from memory or disk)
    disk_cached_tokens: int = 0  # of those, loaded from the spill store
    prefill_tokens: int = 0  # prompt tokens actually computed
    stop_reason: str = ""  # of the first sequence: "stop" (token or string) or "length"
    stop_reasons: list[str] = field(default_factory=list)
    decode_passes: int = 0  # forward passes after the first token
    tokens_per_pass: float = 0.0  # new tokens after the first per decode pass (and sequence): 1 without speculation
    drafted_tokens: int = 0  # speculative decoding: tokens drafted and verified
    acceptance: float = 0.0  # of the drafted tokens, the fraction kept

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)  # the first (or only) sequence
    batch_token_ids: list[list[int]] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class GenerationResult:
    """Generated text with its token ids and stats (what ``generate`` and a chat turn return)."""

    text: str
    token_ids: list[int]
    stats: GenerationStats
    texts: list[str] = field(default_factory=list)  # one per prompt when a list was given
    batch_token_ids: list[list[int]] = field(default_factory=list)


class Chooser:
    """Picks the next token of each row from its logits: transformers' own processors, then argmax or a draw."""

    def __init__(self, cfg: SamplingConfig) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.cfg = cfg
        procs = LogitsProcessorList()
        if cfg.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k > 0:
                procs.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                procs.append(TopPLogitsWarper(cfg.top_p))
        self.procs = procs
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None

    def __call__(self, seen: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = self.procs(seen, logits.float())  # [batch, vocab]
        if not self.cfg.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)


def prefill(model: StreamingModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None):
    """Run the prompt ``[batch, seq]`` (left-padded when ``attention_mask`` is given) through
    the model in chunks of ``model.prefill_chunk`` tokens; return (last logits ``[batch, vocab]``,
    KV cache)."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    n = input_ids.shape[1]
    past = cache.get_seq_length()
    chunk = max(1, model.prefill_chunk // input_ids.shape[0])
    logits = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, : past + e]
            kwargs["position_ids"] = _positions(attention_mask[:, : past + e])[:, past + s :]
        out = model.forward(input_ids[:, s:e], cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        logits, cache = out.logits[:, -1, :], out.cache
    return logits, cache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def decode_step(model: StreamingModel, token: torch.Tensor, cache, attention_mask: torch.Tensor | None = None):
    """Feed one token per sequence ``[batch, 1]``; return (logits ``[batch, vocab]``, cache).
    ``attention_mask`` covers the cache plus this token."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = _positions(attention_mask)[:, -1:]
    out = model.forward(token, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1, :], out.cache


def context_limit(model: StreamingModel, kv_tokens: int | None = None) -> int:
    """Tokens one sequence may hold: the model's context, and at most the KV reserved (``kv_tokens``,
    default the budget's ``model.context_tokens``)."""
    kv = model.context_tokens if kv_tokens is None else kv_tokens
    ctx = getattr(model.config, "max_position_embeddings", None)
    return min(kv, ctx) if ctx else kv


def check_context(model: StreamingModel, batch: int, prompt_tokens: int, max_new_tokens: int, *, kv_tokens: int | None = None,
                  kv_token_bytes: int | None = None) -> None:
    """Refuse a request longer than the model's context or than the KV the budget reserved
    (``kv_tokens``, default ``model.context_tokens``; ``kv_token_bytes``: what a token of it takes).

    Raises:
        InvalidRequestError: an empty prompt.
        ContextLengthError: with the numbers and the fix.
    """
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    need = prompt_tokens + max_new_tokens
    ctx = getattr(model.config, "max_position_embeddings", None)
    kv = model.context_tokens if kv_tokens is None else kv_tokens
    model_error = ContextLengthError(
        f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of {ctx}; "
        "shorten the prompt or ask for fewer tokens",
        prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, limit=ctx or 0,
    )
    if ctx is not None and need > ctx and ctx <= kv // batch:  # the tighter of the two limits is the one said
        raise model_error
    if batch * need > kv:
        from runtime.budget import kv_bytes_per_token
        from runtime.memory import format_size

        per = kv_token_bytes or kv_bytes_per_token(model.config, torch.empty(0, dtype=model.dtype).element_size())
        raise ContextLengthError(
            f"{batch} x ({prompt_tokens} prompt + {max_new_tokens} new) tokens need KV for {batch * need} tokens "
            f"({format_size(batch * need * per)}), but the budget of {format_size(model.plan.budget_bytes)} reserves "
            f"{kv} tokens; raise --memory-budget by about {format_size((batch * need - kv) * per)}, "
            "pass a larger context_tokens, or shorten the request",
            prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, limit=kv // batch,
        )
    if ctx is not None and need > ctx:
        raise model_error
