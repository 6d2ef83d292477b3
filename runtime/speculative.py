"""Speculative decoding for one sequence: a cheap draft proposes tokens, the streamed model
checks them all in one pass, and the longest prefix it agrees with is kept.

One pass over the streamed layers reads every streamed layer once whether it computes one
row or sixteen, so a pass that verifies ``k`` drafted tokens costs little more than one that
decodes a single token when the disk is the bound. The output is the model's own:

* greedy: a drafted token is kept while it equals the model's argmax at its position; the
  model's own token at the first disagreement (or after the last drafted one) follows, so the
  tokens equal plain greedy decoding;
* sampling: the rejection rule of Leviathan et al. (2023) / Chen et al. (2023). A draft here
  is deterministic (its ``q`` is one-hot), so drafted token ``x`` is kept with probability
  ``p(x)``, and on rejection the token is drawn from ``p`` with ``x`` removed and renormalized;
  each emitted token is then distributed exactly as plain sampling's.

Drafts (:class:`Drafter`): :class:`PromptLookup` (n-grams of the prompt and the text so far
propose what followed them last time; no weights) and :class:`ModelDrafter` (a small model of
the same tokenizer, greedy, on its own KV cache).

After a pass the KV holds the fed tokens; :func:`rollback` drops the rejected ones (a
transformers ``DynamicCache`` is cropped, sli's paged cache releases their blocks, see
:meth:`runtime.kv.PagedKVCache.truncate`). :class:`DraftLength` picks how many tokens to draft
from the measured acceptance and the measured pass cost ``a + b * rows``; where drafts keep
missing it drafts nothing (plain decoding), probing now and then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

import torch

from runtime.kv import PagedKVCache, PrefixCachingSession
from runtime.memory import PeakMemorySampler
from runtime.phases import Chooser, Step, check_context, prefill

logger = logging.getLogger(__name__)


class Speculative(str, Enum):
    """Where drafted tokens come from."""

    LOOKUP = "lookup"  # n-grams of the prompt and the text so far
    DRAFT = "draft"  # a small model with the same tokenizer


@dataclass(frozen=True)
class SpeculativeConfig:
    """How speculation runs.

    Attributes:
        method: the draft (:class:`Speculative`).
        max_draft: most tokens drafted for one pass (the pass runs ``max_draft + 1`` rows).
        min_ngram, max_ngram: n-gram lengths prompt lookup matches, longest first.
        initial_draft: tokens drafted while the pass cost is not yet measured.
        probe_every: when drafting does not pay, draft one token every this many passes, so
            the acceptance is measured again (at most one extra row in this many passes).
        adaptive: off, every pass drafts ``max_draft`` tokens where the draft has them (tests).
    """

    method: Speculative = Speculative.LOOKUP
    max_draft: int = 8
    min_ngram: int = 1
    max_ngram: int = 4
    initial_draft: int = 4
    probe_every: int = 32
    adaptive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Speculative(self.method))
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        if not 0 <= self.initial_draft <= self.max_draft:
            raise ValueError(f"initial_draft must be in [0, max_draft={self.max_draft}], got {self.initial_draft}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")

    @classmethod
    def create(cls, speculative: "str | Speculative | SpeculativeConfig") -> "SpeculativeConfig":
        """A config from a method name (``"lookup"``, ``"draft"``) or a config.

        Raises:
            ValueError: an unknown method, naming the known ones.
        """
        if isinstance(speculative, SpeculativeConfig):
            return speculative
        try:
            return cls(method=Speculative(speculative))
        except ValueError as e:
            raise ValueError(f"speculative must be None, {', '.join(repr(m.value) for m in Speculative)}; got {speculative!r}") from e


@runtime_checkable
class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``tokens`` (all tokens so far: prompt and output)."""

    def propose(self, tokens: list[int], k: int) -> list[int]: ...


class PromptLookup:
    """Prompt lookup decoding: the last ``n`` tokens (``n`` from ``max_ngram`` down to
    ``min_ngram``) are looked up among the earlier text, and what followed their latest earlier
    occurrence is proposed. An index ``n-gram -> where its continuation starts`` grows with
    the text, so a lookup costs a few dict probes."""

    def __init__(self, *, min_ngram: int = 1, max_ngram: int = 4) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}

    def _extend(self, tokens: list[int]) -> None:
        if tokens[: len(self.tokens)] != self.tokens:  # another text (or a rolled-back one): index it afresh
            self.tokens, self.index = [], {}
        for j in range(len(self.tokens), len(tokens)):
            self.tokens.append(tokens[j])
            for n in range(self.min_ngram, self.max_ngram + 1):
                if j - n >= 0:  # the n-gram ending just before j is followed by token j
                    self.index[tuple(tokens[j - n : j])] = j

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self._extend(tokens)
        if k < 1:
            return []
        n_all = len(tokens)
        for n in range(min(self.max_ngram, n_all - 1), self.min_ngram - 1, -1):
            start = self.index.get(tuple(tokens[n_all - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class ModelDrafter:
    """A small model drafts greedily on its own KV cache (a ``DynamicCache``), which follows the
    accepted text: before drafting, what it holds beyond the common prefix is cropped and the
    missing tokens are fed."""

    def __init__(self, model) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.held: list[int] = []  # tokens whose KV the draft cache holds

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int) -> list[int]:

        if k < 1:
            return []
        common = 0
        for a, b in zip(self.held, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # feed at least one token, so there are logits
        rollback(self.cache, common)
        self.held = self.held[:common]
        feed = tokens[common:]
        draft: list[int] = []
        for _ in range(k):
            logits, self.cache = prefill(self.model, torch.tensor([feed]), cache=self.cache)
            self.held += feed
            feed = [int(logits[0].argmax())]
            draft.append(feed[0])
        return draft


def rollback(cache, length: int) -> None:
    """Keep the KV of the first ``length`` tokens only (a rejected draft's tokens leave)."""
    if isinstance(cache, PagedKVCache):
        cache.truncate(length)
        return
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"cannot roll a cache of {cache.get_seq_length()} tokens forward to {length}")
    if extra:
        cache.crop(-extra)


class PassCost:
    """The time of a pass as ``a + b * rows``, fitted online: a decaying mean time per row count,
    and a weighted least-squares line through those points."""

    def __init__(self, *, decay: float = 0.8) -> None:
        self.decay = decay
        self.mean: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def add(self, rows: int, seconds: float) -> None:
        m = self.mean.get(rows)
        self.mean[rows] = seconds if m is None else self.decay * m + (1 - self.decay) * seconds
        self.count[rows] = self.count.get(rows, 0) + 1

    def fit(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None while fewer than two row counts were measured."""
        if len(self.mean) < 2:
            return None
        w = {r: min(c, 8) for r, c in self.count.items()}
        sw = sum(w.values())
        mr = sum(w[r] * r for r in w) / sw
        mt = sum(w[r] * self.mean[r] for r in w) / sw
        var = sum(w[r] * (r - mr) ** 2 for r in w)
        b = max(0.0, sum(w[r] * (r - mr) * (self.mean[r] - mt) for r in w) / var)
        a = max(mt - b * mr, 1e-3 * mt)
        return a, b


class DraftLength:
    """How many tokens to draft next. The acceptance ``alpha`` is the chance a drafted token is
    kept given the one before it was (counted with decay); a pass drafting ``k`` then yields
    ``(1 - alpha ** (k + 1)) / (1 - alpha)`` tokens in expectation, and ``k`` is chosen to
    maximize that over the pass's fitted cost. ``k = 0`` is plain decoding; then one token is
    drafted every ``probe_every`` passes to measure ``alpha`` again."""

    def __init__(self, cfg: SpeculativeConfig, *, decay: float = 0.9) -> None:
        self.cfg, self.decay = cfg, decay
        self.cost = PassCost()
        self.kept = 0.0  # decayed count of kept drafted tokens
        self.trials = 0.0  # decayed count of drafted tokens judged (kept ones plus first rejections)
        self.idle = 0

    @property
    def alpha(self) -> float:
        return (self.kept + 1) / (self.trials + 2)

    def observe(self, *, drafted: int, kept: int, rows: int, seconds: float) -> None:
        self.cost.add(rows, seconds)
        if drafted:
            self.kept = self.decay * self.kept + kept
            self.trials = self.decay * self.trials + kept + (kept < drafted)

    def next(self) -> int:
        cfg = self.cfg
        if not cfg.adaptive:
            return cfg.max_draft
        fit = self.cost.fit()
        if fit is None:
            return cfg.initial_draft
        a, b = fit
        alpha = min(self.alpha, 0.999)
        rate = [(1 - alpha ** (k + 1)) / (1 - alpha) / (a + b * (k + 1)) for k in range(cfg.max_draft + 1)]
        k = max(range(len(rate)), key=rate.__getitem__)
        if k:
            self.idle = 0
            return k
        self.idle += 1
        if self.idle >= cfg.probe_every:
            self.idle = 0
            return 1
        return 0


def accept_greedy(scores: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """Greedy verification: ``scores`` ``[k + 1, vocab]`` at the pass's positions, ``draft`` the
    ``k`` drafted tokens. Returns (how many drafted tokens are kept, the model's next token)."""
    best = scores.argmax(dim=-1).tolist()
    n = 0
    while n < len(draft) and best[n] == draft[n]:
        n += 1
    return n, best[n]


def accept_sampled(probs: torch.Tensor, draft: list[int], gen: torch.Generator | None) -> tuple[int, int]:
    """The rejection rule for a deterministic draft: ``probs`` ``[k + 1, vocab]`` the model's
    distributions (after temperature, top-k, top-p). Drafted token ``x`` at row ``i`` is kept
    with probability ``p_i(x)``; on rejection the token is drawn from ``p_i`` without ``x``,
    renormalized; after ``k`` kept tokens, the next is drawn from ``p_k``.
    Returns (kept, next token)."""
    for i, x in enumerate(draft):
        p = probs[i]
        if torch.rand((), generator=gen).item() < p[x].item():
            continue
        rest = p.clone()
        rest[x] = 0
        return i, int(torch.multinomial(rest / rest.sum(), 1, generator=gen))
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=gen))


def _row_scores(choose, context: list[int], draft: list[int], logits: torch.Tensor) -> torch.Tensor:
    """The processed scores ``[k + 1, vocab]`` of each verified row, each seeing the context and
    the drafted tokens before it (what the repetition penalty looks at)."""
    if not len(choose.procs):
        return logits.float()
    return torch.cat([choose.procs(torch.tensor([context + draft[:i]]), logits[i : i + 1].float()) for i in range(len(draft) + 1)])


def stream_speculative(model, input_ids: torch.Tensor, cfg, out, *, speculative, draft=None, attention_mask=None,
                       should_stop=None, prefix_cache: PrefixCachingSession | None = None) -> Iterator:
    """:func:`runtime.generate.stream` with speculation (the same contract, one sequence).
    ``speculative``: ``"lookup"``, ``"draft"`` or a :class:`SpeculativeConfig`; ``draft``: for
    ``"draft"``, the draft model (a ``StreamingModel`` of the same tokenizer) or any :class:`Drafter`.

    Raises:
        ValueError: a batch, a left-padding mask, an unknown method, or ``"draft"`` without a draft model.
    """

    spec = SpeculativeConfig.create(speculative)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"speculative decoding serves one sequence (got a batch of {input_ids.shape[0]}); a batch "
                         "already fills each pass with its rows: pass speculative=None")
    if spec.method is Speculative.DRAFT and draft is None:
        raise ValueError("speculative='draft' needs draft=, a small model with the same tokenizer")
    if spec.method is Speculative.LOOKUP:
        drafter: Drafter = PromptLookup(min_ngram=spec.min_ngram, max_ngram=spec.max_ngram)
    else:
        drafter = draft if isinstance(draft, Drafter) else ModelDrafter(draft)
    n = input_ids.shape[1]
    check_context(model, 1, n, cfg.max_new_tokens)
    choose = Chooser(cfg)
    length = DraftLength(spec)
    stats = out.stats
    stats.prompt_tokens = n
    out.batch_token_ids = [[]]
    new = out.token_ids = out.batch_token_ids[0]
    prompt = input_ids[0].tolist()
    reason = ""
    mem = PeakMemorySampler(interval=None).__enter__()
    t0 = t1 = time.perf_counter()
    prefill_bytes = passes = drafted = kept = 0
    cache = None
    try:
        model.reset_stats()
        if cfg.max_new_tokens == 0:
            reason = "length"
            return
        cached = 0
        if prefix_cache is not None:
            cache, cached, stats.disk_cached_tokens = prefix_cache.start(prompt)
        stats.cached_tokens, stats.prefill_tokens = cached, n - cached
        logits, cache = prefill(model, input_ids[:, cached:], cache=cache)
        mem.sample()
        pending = [int(choose(input_ids, logits)[0])]
        t1 = time.perf_counter()
        stats.time_to_first_token_s = t1 - t0
        stats.prefill_tokens_per_s = n / (t1 - t0)
        prefill_bytes = model.stats.bytes_read
        while True:
            for tid in pending:  # emit: one by one, so stop tokens and strings end the run where plain decoding would
                new.append(tid)
                stats.new_tokens += 1
                if tid in cfg.stop_token_ids or (should_stop is not None and should_stop(0, new)):
                    reason = "stop"
                elif len(new) == cfg.max_new_tokens:
                    reason = "length"
                yield Step((tid,), len(new) - 1)
                if reason:
                    return
            text = prompt + new  # the KV holds all of it but the last token
            k = min(length.next(), cfg.max_new_tokens - len(new) - 1)
            guess = drafter.propose(text, k)[:k] if k > 0 else []
            rows = torch.tensor([text[-1:] + guess])  # [1, k + 1]
            tp = time.perf_counter()
            fwd = model.forward(rows, cache=cache, use_cache=True, logits_to_keep=rows.shape[1])
            logits, cache = fwd.logits[0], fwd.cache  # [k + 1, vocab]
            seconds = time.perf_counter() - tp
            mem.sample()
            scores = _row_scores(choose, text, guess, logits)
            if cfg.do_sample:
                got, nxt = accept_sampled(torch.softmax(scores, dim=-1), guess, choose.gen)
            else:
                got, nxt = accept_greedy(scores, guess)
            rollback(cache, len(text) + got)
            length.observe(drafted=len(guess), kept=got, rows=rows.shape[1], seconds=seconds)
            passes += 1
            drafted += len(guess)
            kept += got
            pending = guess[:got] + [nxt]
    finally:
        t2 = time.perf_counter()
        if prefix_cache is not None and cache is not None:
            held = prompt + new[:-1]  # every token but the last was fed; a stop inside a kept run leaves more in the KV
            rollback(cache, min(len(held), cache.held_tokens))
            prefix_cache.finish(cache, held)
        mem.__exit__(None, None, None)
        stats.stop_reason = reason or "interrupted"
        stats.stop_reasons = [stats.stop_reason]
        decoded = stats.new_tokens - 1
        stats.decode_tokens_per_s = decoded / (t2 - t1) if decoded > 0 and passes else 0.0
        stats.bytes_read_per_token = (model.stats.bytes_read - prefill_bytes) / decoded if decoded > 0 and passes else 0.0
        stats.prefetch_hit_rate = model.stats.prefetch_hit_rate
        stats.hidden_io_fraction = model.stats.hidden_io_fraction
        stats.peak_rss_bytes = mem.peak_bytes
        stats.tokens_per_pass = decoded / passes if passes else 0.0
        stats.acceptance = kept / drafted if drafted else 0.0
        stats.decode_passes, stats.drafted_tokens = passes, drafted
        logger.debug("speculative (%s): %d passes, %d drafted, %d kept, final alpha %.2f, cost fit %s",
                     spec.method.value, passes, drafted, kept, length.alpha, length.cost.fit())
