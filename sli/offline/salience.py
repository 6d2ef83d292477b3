"""Mixed precision chosen by measurement: give each linear weight the codec that buys the
most quality per bit, until an average bits-per-weight target is met.

1. Calibrate: run the unquantized model (mode ``none``, streamed within the budget) over a
   little calibration text and record, for every linear layer, the mean square of each
   input channel, ``s_k = E[x_k^2]``.
2. Measure: read the source one tensor at a time; encode it with every candidate codec and
   score the error its *output* would get, ``sum((W - Q(W))^2 * s) / sum(W^2 * s)`` — the
   relative output error for inputs with those statistics — and its bytes.
3. Assign: start every tensor at the cheapest candidate, then repeatedly take the upgrade
   with the largest error reduction per extra byte while the average stays within the target.

The calibration text is stdlib docstrings, not the pydoc topics that `sli validate` scores,
so the plan is not fitted to the evaluation text. Memory stays bounded: one tensor and its
candidates at a time, plus one vector per linear layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.config import QuantizationConfig, QuantizationMode, is_quantizable, module_matches

logger = logging.getLogger(__name__)

CALIBRATION_MODULES = ("collections", "itertools", "functools", "json", "re", "pathlib", "argparse", "dataclasses", "logging")


def calibration_text() -> str:
    """Docstrings of a few stdlib modules and their public members (ships with Python)."""
    import importlib
    import inspect

    parts = []
    for name in CALIBRATION_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(mod, attr, None))
                if doc and len(doc) > 80:
                    parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Candidate:
    label: str
    config: QuantizationConfig


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
    target_bits: float
    achieved_bits: float  # over the assigned tensors
    choices: dict[str, str] = field(default_factory=dict)  # tensor -> candidate label
    scores: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # tensor -> label -> (bytes, error)

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


def weighted_error(w: torch.Tensor, approx: torch.Tensor, s: torch.Tensor) -> float:
    """Relative output error of ``approx`` for inputs with channel mean squares ``s``."""
    w = w.float()
    num = float(((w - approx.float()).pow(2) * s[None, :]).sum())
    den = float((w.pow(2) * s[None, :]).sum())
    return num / den if den > 0 else 0.0


def plan_by_salience(
    source,
    reference_model,
    tokenizer,
    *,
    target_bits: float,
    candidates: list[Candidate] | None = None,
    calibration_tokens: int = 1024,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head", "embed_tokens"),
    progress: bool = True,
) -> SaliencePlan:
    """Assign a codec to every quantizable linear weight to meet ``target_bits`` on average.

    Args:
        source: the model's :class:`~sli.offline.sources.ModelSource` (read one tensor at a time).
        reference_model: a mode-``none`` :class:`~runtime.executor.StreamingModel` of it, for calibration.
        target_bits: average bits per weight over the quantized tensors (codes plus scales).

    Raises:
        ValueError: the target is below what the cheapest candidate needs.
    """
    from cache.codecs import decode_tensor, get_codec

    candidates = candidates or default_candidates()
    ids = torch.tensor(tokenizer(calibration_text())["input_ids"][:calibration_tokens])
    s_in = input_statistics(reference_model, ids)
    scores: dict[str, dict[str, tuple[int, float]]] = {}
    numel: dict[str, int] = {}
    names = [n for n in source.tensor_names() if n.endswith(".weight") and not module_matches(n.rsplit(".", 1)[0], skip_modules)]
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
    total = sum(numel.values())
    budget = target_bits * total / 8
    cheapest = {n: min(sc, key=lambda lbl: sc[lbl][0]) for n, sc in scores.items()}
    used = sum(scores[n][cheapest[n]][0] for n in scores)
    if used > budget:
        raise ValueError(
            f"target of {target_bits} bits per weight is below the {8 * used / total:.2f} the cheapest candidate needs; raise --target-bits"
        )
    choice = dict(cheapest)
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
            break
        n, lbl, extra = best
        choice[n] = lbl
        used += extra
    by_label = {c.label: c.config for c in candidates}
    overrides = {n: by_label[lbl] for n, lbl in choice.items()}
    plan = AdaptiveQuantizer(
        base_config=QuantizationConfig(mode=QuantizationMode.NONE),
        attention_config=QuantizationConfig(mode=QuantizationMode.NONE),
        ffn_config=QuantizationConfig(mode=QuantizationMode.NONE),
        skip_modules=list(skip_modules),
        overrides=overrides,
    )
    achieved = 8 * used / total if total else math.nan
    logger.info("salience plan: %.3f bits/weight (target %.2f): %s", achieved, target_bits, SaliencePlan(plan, target_bits, achieved, choice).counts())
    return SaliencePlan(plan, target_bits, achieved, choice, scores)
