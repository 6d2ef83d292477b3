"""Generation over a `StreamingModel`: named phases `prefill` and `decode_step`, a
`stream` generator yielding typed steps, and `generate` as a thin wrapper over it.

Sampling uses transformers' own logits processors (repetition penalty, temperature,
top-k, top-p); greedy decoding is the default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from runtime.executor import StreamingModel
from runtime.memory import PeakMemorySampler


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``do_sample=False`` is greedy and ignores the rest."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True)
class Step:
    """One generated token."""

    token_id: int
    index: int  # 0 for the first new token


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    bytes_read_per_token: float = 0.0  # cache bytes read per decoded token
    peak_rss_bytes: int = 0
    stop_reason: str = ""


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


class _Chooser:
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


def prefill(model: StreamingModel, input_ids: torch.Tensor):
    """Run the prompt ``[1, seq]`` through the model; return (last logits ``[1, vocab]``, KV cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model.forward(input_ids, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :], out.past_key_values


def decode_step(model: StreamingModel, token: torch.Tensor, cache):
    """Feed one token ``[1, 1]``; return (logits ``[1, vocab]``, cache)."""
    out = model.forward(token, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :], out.past_key_values


def stream(model: StreamingModel, input_ids: torch.Tensor, cfg: SamplingConfig, out: GenerationOutput) -> Iterator[Step]:
    """Yield new tokens one by one; fills ``out`` (tokens and stats) as it goes.

    Raises:
        ValueError: the prompt is empty or longer than the model's context.
    """
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    n = input_ids.shape[1]
    ctx = getattr(model.config, "max_position_embeddings", None)
    if n == 0:
        raise ValueError("the prompt is empty")
    if ctx is not None and n + cfg.max_new_tokens > ctx:
        raise ValueError(
            f"prompt of {n} tokens plus max_new_tokens={cfg.max_new_tokens} exceeds the model's context of {ctx}; "
            "shorten the prompt or ask for fewer tokens"
        )
    choose = _Chooser(cfg)
    stats = out.stats
    stats.prompt_tokens = n
    seen = input_ids
    with PeakMemorySampler() as mem:
        model.reset_stats()
        t0 = time.perf_counter()
        if cfg.max_new_tokens == 0:
            stats.stop_reason = "length"
            return
        logits, cache = prefill(model, input_ids)
        tok = choose(seen, logits)
        t1 = time.perf_counter()
        stats.time_to_first_token_s = t1 - t0
        stats.prefill_tokens_per_s = n / (t1 - t0)
        prefill_bytes = model.stats.bytes_read
        for i in range(cfg.max_new_tokens):
            tid = int(tok[0])
            out.token_ids.append(tid)
            stats.new_tokens = i + 1
            yield Step(tid, i)
            if tid in cfg.stop_token_ids:
                stats.stop_reason = "stop"
                break
            if i + 1 == cfg.max_new_tokens:
                stats.stop_reason = "length"
                break
            seen = torch.cat([seen, tok[:, None]], dim=1)
            logits, cache = decode_step(model, tok[:, None], cache)
            tok = choose(seen, logits)
        t2 = time.perf_counter()
        decoded = max(stats.new_tokens - 1, 0)
        stats.decode_tokens_per_s = decoded / (t2 - t1) if decoded else 0.0
        stats.bytes_read_per_token = (model.stats.bytes_read - prefill_bytes) / decoded if decoded else 0.0
    stats.peak_rss_bytes = mem.peak_bytes


def generate(model: StreamingModel, input_ids: torch.Tensor, cfg: SamplingConfig) -> GenerationOutput:
    """Blocking wrapper over :func:`stream`."""
    out = GenerationOutput()
    for _ in stream(model, input_ids, cfg, out):
        pass
    return out
