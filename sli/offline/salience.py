"""Mixed precision chosen by measurement: give each weight the codec that buys the most
quality per bit, to meet an average bits-per-weight target (``--target-bits``) or, with the
fewest bits, a perplexity-loss target (``--target-loss``). One planner: both targets rank
the same way (:func:`assign`), they differ in what they measure.

Bits target:

1. Calibrate: run the unquantized model (mode ``none``, streamed within the budget) over a
   little calibration text and record, for every linear layer, the mean square of each
   input channel, ``s_k = E[x_k^2]``.
2. Measure: read the source one tensor at a time; encode it with every candidate codec and
   score the error its *output* would get, ``sum((W - Q(W))^2 * s) / sum(W^2 * s)`` — the
   relative output error for inputs with those statistics — and its bytes.
3. Assign: start every tensor at the cheapest candidate, then repeatedly take the upgrade
   with the largest error reduction per extra byte while the average stays within the target.

Loss target (:mod:`sli.offline.lossprobe` measures):

1. Every linear of every layer gets each calibrated candidate (GPTQ on int3/int4 groups of
   several sizes, int8 per channel; or kept), scored by its relative output error on the
   calibration samples and its bytes; the embeddings and head get row candidates (int4
   groups, int8, kept).
2. The embeddings and head are measured apart: each takes its cheapest candidate whose
   held-out loss alone is at most ``ROW_SHARE`` of the target.
3. The layers: for a byte budget, :func:`assign` gives an assignment; the budget is bisected
   on the *measured* held-out loss of the whole assignment (embeddings and head included),
   and the smallest budget under the target wins. The held-out text is the end of the
   calibration text, which no sample overlaps.

The calibration text is the one shipped with sli (stdlib docstrings), never the pydoc topics
that `sli validate` scores, so the plan is not fitted to the evaluation text. Memory stays
bounded: one tensor (or one layer) and its candidates at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.calibration import HOLDOUT_TOKENS, CalibrationConfig, read_text
from sli.offline.config import QuantizationConfig, QuantizationMode, is_quantizable, is_vocab, module_matches
from sli.offline.lossprobe import KEEP, Candidate, LossProbe, loss_candidates, row_candidates

logger = logging.getLogger(__name__)

ROW_SHARE = 0.25  # of a loss target, what the embeddings and head may take together


def calibration_text() -> str:
    """The calibration text that ships with sli (stdlib docstrings; see :mod:`sli.offline.calibration`)."""
    return read_text(None)


def default_candidates() -> list[Candidate]:
    return [
        Candidate("int2-g64", QuantizationConfig(mode=QuantizationMode.INT2, group_size=64)),
        Candidate("nf4", QuantizationConfig(mode=QuantizationMode.NF4)),
        Candidate("int4-g64", QuantizationConfig(mode=QuantizationMode.INT4, group_size=64)),
        Candidate("int4-g32", QuantizationConfig(mode=QuantizationMode.INT4, group_size=32)),
        Candidate("int8", QuantizationConfig(mode=QuantizationMode.INT8_DYNAMIC)),
    ]


@dataclass
class SaliencePlan:
    plan: AdaptiveQuantizer
    target_bits: float | None
    achieved_bits: float  # bits target: over every parameter (stored bytes); loss target: over the layers' linears
    choices: dict[str, str] = field(default_factory=dict)  # tensor -> candidate label
    scores: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # tensor -> label -> (bytes, error)
    target_loss: float | None = None  # percent
    loss: float | None = None  # the held-out loss measured for the plan, percent
    bits_all: float | None = None  # bits per weight over every parameter (embeddings, head, norms)
    row_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # embeddings/head: label -> loss alone
    steps: list[dict] = field(default_factory=list)  # the budgets tried: bits, loss
    built_loss: float | None = None  # the held-out loss of the cache built from the plan, percent

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices.values():
            out[c] = out.get(c, 0) + 1
        return out


@torch.inference_mode()
def input_statistics(model, input_ids: torch.Tensor, *, window: int = 256) -> dict[str, torch.Tensor]:
    """Mean square of each input channel of every linear inside the decoder layers."""
    stats: dict[str, list] = {}
    hooks = []
    for name, mod in model.layers.named_modules(prefix=model.arch.layers):
        if isinstance(mod, torch.nn.Linear):

            def hook(m, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                acc = stats.setdefault(name, [torch.zeros(x.shape[1]), 0])
                acc[0] += x.pow(2).sum(0)
                acc[1] += x.shape[0]

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        ids = input_ids.reshape(-1)
        for s in range(0, ids.numel(), window):
            model.forward(ids[s : s + window][None], use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return {name: total / n for name, (total, n) in stats.items()}


def assign(scores: dict[str, dict[str, tuple[int, float]]], budget: float) -> dict[str, str]:
    """The greedy both targets use: every tensor starts at its cheapest candidate, then the
    upgrade with the largest error reduction per extra byte is taken while the bytes stay
    within ``budget``. Returns tensor -> candidate label."""
    choice = {n: min(sc, key=lambda lbl: (sc[lbl][0], sc[lbl][1])) for n, sc in scores.items()}
    used = sum(scores[n][lbl][0] for n, lbl in choice.items())
    while True:
        best, best_gain = None, 0.0
        for n, sc in scores.items():
            cb, ce = sc[choice[n]]
            for lbl, (b, e) in sc.items():
                extra = b - cb
                if extra <= 0 or e >= ce or used + extra > budget:
                    continue
                gain = (ce - e) / extra
                if gain > best_gain:
                    best, best_gain = (n, lbl, extra), gain
        if best is None:
            return choice
        n, lbl, extra = best
        choice[n] = lbl
        used += extra


def weighted_error(w: torch.Tensor, approx: torch.Tensor, s: torch.Tensor) -> float:
    """Relative output error of ``approx`` for inputs with channel mean squares ``s``."""
    w = w.float()
    num = float(((w - approx.float()).pow(2) * s[None, :]).sum())
    den = float((w.pow(2) * s[None, :]).sum())
    return num / den if den > 0 else 0.0


def plan_by_salience(
    source,
    reference_model=None,
    tokenizer=None,
    *,
    target_bits: float | None = None,
    target_loss: float | None = None,
    calibration: CalibrationConfig | None = None,
    work_dir=None,
    candidates: list[Candidate] | None = None,
    calibration_tokens: int = 1024,
    skip_modules: tuple[str, ...] | list[str] | None = None,
    progress: bool = True,
    aim_loss: float | None = None,
) -> SaliencePlan:
    """Assign a codec to every quantizable weight: to meet ``target_bits`` on average, or,
    with the fewest bits, to keep the perplexity loss on held-out calibration text under
    ``target_loss`` percent (see the module docstring).

    Args:
        source: the model's :class:`~sli.offline.sources.ModelSource` (read one tensor at a time).
        reference_model: bits target: a mode-``none`` :class:`~runtime.executor.StreamingModel` of it, for calibration.
        tokenizer: bits target: its tokenizer.
        target_bits: bits per weight counted over every parameter (embeddings, head, norms)
            from the bytes the cache stores, as a GGUF file's size is; the embeddings and head
            are int8 rows, norms and biases kept, the linears share what is left.
        target_loss: percent perplexity loss allowed on the held-out slice of the calibration text.
        calibration: loss target: the text, samples and seqlen (default: the shipped text,
            GPTQ); the plan quantizes with it. Bits target: the statistics are taken on its
            samples (their first ``calibration_tokens`` tokens; default: the shipped text).
        work_dir: loss target: where candidate records wait (removed afterwards).
        skip_modules: kept unquantized. Default: the head and embeddings for a bits target;
            nothing for a loss target (they are candidates too).
        aim_loss: loss target: plan against this loss instead (below ``target_loss``, which
            stays the recorded target): the processor's retry when a built cache missed it.

    Raises:
        ValueError: no target or both; a target below what the cheapest candidates reach.
    """
    from cache.codecs import decode_tensor, get_codec

    if (target_bits is None) == (target_loss is None):
        raise ValueError("give target_bits or target_loss (one of them)")
    if target_loss is not None:
        if work_dir is None:
            raise ValueError("a loss target needs work_dir, where candidate records wait while they are measured")
        cal = calibration or CalibrationConfig()
        if cal.holdout_tokens == 0:
            cal = dataclasses.replace(cal, holdout_tokens=HOLDOUT_TOKENS)
        return _plan_for_loss(source, target_loss, cal, work_dir,
                              candidates=candidates, skip_modules=tuple(skip_modules or ()), progress=progress, aim=aim_loss)
    skip_modules = tuple(skip_modules or ())
    candidates = candidates or default_candidates()
    if calibration is not None:
        from sli.offline.calibration import calibration_set

        ids = calibration_set(calibration, tokenizer).samples.reshape(-1)[:calibration_tokens]
    else:
        ids = torch.tensor(tokenizer(calibration_text())["input_ids"][:calibration_tokens])
    s_in = input_statistics(reference_model, ids)
    scores: dict[str, dict[str, tuple[int, float]]] = {}
    numel: dict[str, int] = {}
    names = [n for n in source.tensor_names() if n.endswith(".weight") and not module_matches(n.rsplit(".", 1)[0], skip_modules)
             and not is_vocab(n.rsplit(".", 1)[0])]
    for name in tqdm(names, desc="salience", unit="tensor", disable=not progress):
        module = name.removesuffix(".weight")
        if module not in s_in:
            continue
        w = source.read(name)
        if not is_quantizable(name, w):
            continue
        numel[name] = w.numel()
        scores[name] = {}
        for c in candidates:
            choice = c.config.codec_choice()
            enc = get_codec(choice.codec).encode(w, **choice.params)
            scores[name][c.label] = (enc.nbytes, weighted_error(w, decode_tensor(enc, torch.float32), s_in[module]))
        del w
    base = QuantizationConfig(mode=QuantizationMode.NONE, vocab_mode=QuantizationMode.INT8)  # embeddings and head: int8 rows
    plan = AdaptiveQuantizer(base_config=base, attention_config=base, ffn_config=base, skip_modules=list(skip_modules))
    # every parameter counts: what the rest (embeddings, head, norms, skipped) stores comes off the budget first
    total_params = sum(math.prod(source.tensor_meta(n)[0]) for n in source.tensor_names()
                       if not (bool(getattr(source.config, "tie_word_embeddings", False)) and n.endswith("lm_head.weight")))
    other = _planned_bytes(source, plan, set(scores))
    budget = target_bits * total_params / 8 - other
    cheapest = sum(min(b for b, _ in sc.values()) for sc in scores.values())
    if cheapest > budget:
        floor = 8 * (cheapest + other) / total_params
        raise ValueError(
            f"target of {target_bits} bits per weight (all {total_params} parameters) is below the {floor:.2f} that the cheapest "
            f"candidates need with the embeddings, head and norms ({8 * other / total_params:.2f} bits per weight of it); "
            f"raise --target-bits to at least {math.ceil(floor * 100) / 100}")
    choice = assign(scores, budget)
    used = sum(scores[n][lbl][0] for n, lbl in choice.items())
    by_label = {c.label: c.config for c in candidates}
    plan = AdaptiveQuantizer(base_config=base, attention_config=base, ffn_config=base, skip_modules=list(skip_modules),
                             overrides={n: by_label[lbl] for n, lbl in choice.items()})
    achieved = 8 * (used + other) / total_params
    logger.info("salience plan: %.3f bits/weight over every parameter (target %.2f): %s", achieved, target_bits,
                SaliencePlan(plan, target_bits, achieved, choice).counts())
    return SaliencePlan(plan, target_bits, achieved, choice, scores, bits_all=achieved)


def _plan_for_loss(source, target: float, cal: CalibrationConfig, work_dir, *, candidates, skip_modules, progress,
                   aim: float | None = None) -> SaliencePlan:
    goal = target if aim is None else aim  # what the plan is measured against (a retry aims below the target)
    if target <= 0:
        raise ValueError(f"target_loss is a percent perplexity loss and must be positive, got {target}")
    if not cal.method.gptq:
        raise ValueError(f"a loss target measures GPTQ candidates: use calibration method gptq, not {cal.method.value}")
    candidates = candidates or loss_candidates()
    probe = LossProbe(source, cal, work_dir, skip_modules=skip_modules, progress=progress)
    try:
        scores = probe.measure(candidates, row_candidates())
        steps: list[dict] = []
        # the embeddings and head, measured apart: the cheapest rows that cost at most ROW_SHARE of the target
        rows: dict[str, str] = {}
        row_losses: dict[str, dict[str, float]] = {}
        for name, sc in scores.rows.items():
            row_losses[name] = {}
            for lbl in sorted(sc, key=lambda lbl: sc[lbl][0]):
                loss = probe.loss({name: lbl}) if lbl != KEEP else 0.0
                row_losses[name][lbl] = loss
                logger.info("%s as %s alone: %+.2f%% held-out loss", name, lbl, loss)
                if loss <= ROW_SHARE * goal:
                    rows[name] = lbl
                    break
        numel_layers = {n: scores.numel[n] for n in scores.layers}

        def measure(budget: float) -> tuple[dict[str, str], float, int]:
            choice = assign(scores.layers, budget)
            used = sum(scores.layers[n][lbl][0] for n, lbl in choice.items())
            loss = probe.loss({**choice, **rows})
            steps.append({"bits": 8 * used / sum(numel_layers.values()), "loss": loss})
            logger.info("layers at %.3f bits/weight: %+.3f%% held-out loss (target %.2f%%)", steps[-1]["bits"], loss, target)
            return choice, loss, used

        lo = sum(min(b for b, _ in sc.values()) for sc in scores.layers.values())
        int8 = sum(sc.get("int8", sc[KEEP])[0] for sc in scores.layers.values())
        kept = sum(sc[KEEP][0] for sc in scores.layers.values())
        best = None
        for hi in (int8, kept):
            choice, loss, used = measure(hi)
            if loss <= goal:
                best = (choice, loss, used)
                break
        if best is None:
            raise ValueError(f"even with every layer weight kept the held-out loss is {loss:+.2f}% (embeddings and head: "
                             f"{rows}), above the target {target}%; raise --target-loss")
        choice, loss, used = measure(lo)
        if loss <= goal:
            best = (choice, loss, used)
        else:
            for _ in range(6):  # bisection on the byte budget: the smallest one measured under the target
                mid = (lo + hi) / 2
                choice, loss, used = measure(mid)
                if loss <= goal:
                    hi, best = mid, (choice, loss, used)
                else:
                    lo = mid
        choice, loss, used = best
        labels = {c.label: c.config for c in [*candidates, *row_candidates()]}
        overrides = {n: labels[lbl] for n, lbl in {**choice, **rows}.items() if lbl != KEEP}
        row_bytes = sum(scores.rows[n][lbl][0] for n, lbl in rows.items())
        other = _other_bytes(source, set(scores.layers) | set(scores.rows))
        total_params = sum(math.prod(source.tensor_meta(n)[0]) for n in source.tensor_names())
        bits_all = 8 * (used + row_bytes + other) / total_params
        achieved = 8 * used / sum(numel_layers.values())
        plan = AdaptiveQuantizer(
            base_config=QuantizationConfig(mode=QuantizationMode.NONE),
            attention_config=QuantizationConfig(mode=QuantizationMode.NONE),
            ffn_config=QuantizationConfig(mode=QuantizationMode.NONE),
            skip_modules=[],
            overrides=overrides,
            calibration=cal,
            planned={"target_loss": target, **({"aimed_loss": round(goal, 4)} if aim is not None else {}), "loss": round(loss, 4), "bits_per_weight": round(bits_all, 4),
                     "layer_bits_per_weight": round(achieved, 4), **{f"rows:{n}": lbl for n, lbl in rows.items()}},
        )
        sp = SaliencePlan(plan, None, achieved, {**choice, **rows}, {**scores.layers, **scores.rows}, target_loss=target,
                          loss=loss, bits_all=bits_all, row_losses=row_losses, steps=steps)
        logger.info("loss plan: %+.3f%% held-out loss (target %.2f%%), %.3f bits/weight over all tensors: %s",
                    loss, target, bits_all, sp.counts())
        return sp
    finally:
        probe.close()


def _planned_bytes(source, plan, measured: set[str]) -> int:
    """Bytes the tensors outside ``measured`` take as ``plan`` encodes them (a tied head once)."""
    from cache.codecs import CodecName, get_codec

    total = 0
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    for n in source.tensor_names():
        if n in measured or (tied and n.endswith("lm_head.weight")):
            continue
        choice = plan.choose(n, torch.empty(source.tensor_meta(n)[0], device="meta"))
        if choice.codec is CodecName.RAW:
            total += source.tensor_nbytes(n)
        else:
            total += get_codec(choice.codec).encode(source.read(n), **choice.params).nbytes
    return total


def _other_bytes(source, measured: set[str]) -> int:
    """Bytes of the tensors no candidate was measured for (norms, biases, skipped): kept as they are."""
    total = 0
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    for n in source.tensor_names():
        if n in measured or (tied and n.endswith("lm_head.weight")):
            continue
        total += source.tensor_nbytes(n)
    return total
