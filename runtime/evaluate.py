"""Quality measurements over a `StreamingModel`: sliding-window perplexity and greedy
retention against a reference model.

Perplexity follows the usual sliding-window recipe: windows of ``max_length`` tokens that
advance by ``stride``; each window scores only the tokens not scored by the previous one,
with the earlier tokens of the window as context. The loss is computed from the logits of
those scored positions only, so a window never holds a full ``[length, vocab]`` logits
tensor for context it does not score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from runtime.executor import StreamingModel
from runtime.generate import SamplingConfig, generate


def default_text() -> str:
    """The evaluation text that ships with every Python: the pydoc topic help pages."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    nll_sum: float
    windows: int


@torch.inference_mode()
def perplexity(model: StreamingModel, input_ids: torch.Tensor, *, max_length: int = 512, stride: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of ``input_ids`` (``[seq]`` or ``[1, seq]``).

    Raises:
        ValueError: fewer than two tokens, or a bad window.
    """
    ids = input_ids.reshape(-1)
    n = ids.numel()
    stride = stride or max_length // 2
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        new = end - prev_end  # tokens this window scores (the last `new` positions)
        window = ids[begin:end][None]
        # logits at position t predict token t+1: score positions end-new-1 .. end-2
        keep = min(new, window.shape[1] - 1) if begin == 0 else new
        out = model.forward(window, use_cache=False, logits_to_keep=keep + 1)
        logits = out.logits[0, :-1].float()  # predictions for the last `keep` tokens
        targets = window[0, -keep:]
        nll += float(F.cross_entropy(logits[-keep:], targets, reduction="sum"))
        scored += keep
        windows += 1
        prev_end = end
        if end == n:
            break
    return PerplexityResult(math.exp(nll / scored), scored, nll, windows)


@torch.inference_mode()
def paged_perplexity(model: StreamingModel, input_ids: torch.Tensor, pool, *, max_length: int = 512,
                     stride: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity as :func:`perplexity`, with every window's KV going through the
    paged ``pool`` (:class:`runtime.kv.BlockPool`) in prefill chunks: attention reads the KV as
    the pool stores it (int8 blocks quantized and dequantized, as decoding sees them).

    Raises:
        ValueError: fewer than two tokens, a bad window, or a window longer than the pool.
    """
    from runtime.kvbatch import SeqSlice, forward_step, step_layout

    ids = input_ids.reshape(-1)
    n = ids.numel()
    stride = stride or max_length // 2
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if not 0 < stride <= max_length or max_length > pool.num_blocks * pool.block_size:
        raise ValueError(f"stride must be in 1..max_length ({max_length}) and max_length at most the pool's "
                         f"{pool.num_blocks * pool.block_size} tokens")
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[begin:end]
        first = end - (end - prev_end if begin else end - 1)  # positions first .. end-2 predict tokens first+1 .. end-1
        blocks = [pool.allocate() for _ in range(-(-len(window) // pool.block_size))]
        try:
            for s in range(0, len(window), model.prefill_chunk):
                e = min(len(window), s + model.prefill_chunk)
                layout = step_layout(pool, [SeqSlice(blocks, s, e - s)], model.dtype)
                lo, hi = max(s, first - begin - 1), min(e, len(window) - 1)  # positions that predict scored tokens
                if lo >= hi:  # nothing to score in this chunk; its KV is still written
                    forward_step(model, pool, layout, window[s:e], torch.tensor([e - s - 1]))
                    continue
                logits = forward_step(model, pool, layout, window[s:e], torch.arange(lo - s, hi - s))
                nll += float(F.cross_entropy(logits, window[lo + 1 : hi + 1], reduction="sum"))
                scored += hi - lo
        finally:
            for b in blocks:
                pool.release(b)
        windows += 1
        prev_end = end
        if end == n:
            break
    return PerplexityResult(math.exp(nll / scored), scored, nll, windows)


_REFERENCE_TOKENS: dict = {}


@dataclass(frozen=True)
class RetentionResult:
    exact_match_share: float  # prompts whose greedy continuation equals the reference's
    token_agreement: float  # mean share of positions with the same token, up to the first divergence and after
    prompts: int
    new_tokens: int


def retention(
    model: StreamingModel, reference: StreamingModel, prompts: list[torch.Tensor], *, new_tokens: int = 24
) -> RetentionResult:
    """Compare greedy continuations of ``model`` and ``reference`` on each prompt."""
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    exact, agree = 0, 0.0
    for ids in prompts:
        a = generate(model, ids.reshape(1, -1), cfg).token_ids
        key = (reference.variant_id, str(reference.dtype), tuple(ids.tolist()), new_tokens)
        if key not in _REFERENCE_TOKENS:  # the reference's continuation is computed once per process
            _REFERENCE_TOKENS[key] = generate(reference, ids.reshape(1, -1), cfg).token_ids
        b = _REFERENCE_TOKENS[key]
        exact += a == b
        agree += sum(x == y for x, y in zip(a, b)) / max(len(b), 1)
    return RetentionResult(exact / len(prompts), agree / len(prompts), len(prompts), new_tokens)
