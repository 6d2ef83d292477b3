"""Validation: what a quantized variant lost against the same model unquantized.

`validate` measures, on one text and one prompt set, the perplexity of the quantized
variant and of the reference (mode ``none``, same weights, same runtime), the relative
increase, greedy retention, and gathers the variant's size accounting and per-tensor errors
into one JSON-ready report. `sli validate` writes it and exits non-zero when the perplexity
increase exceeds ``--max-accuracy-loss``, so it can gate a pipeline.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from runtime.evaluate import default_text

logger = logging.getLogger(__name__)

# A fixed, varied prompt set for retention (continuations compared token by token).
RETENTION_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon were",
    "A haiku about autumn:",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
)


_REFERENCE_PPL: dict = {}


@dataclass
class ValidationReport:
    model: str
    mode: str
    model_fingerprint: str
    quant_fingerprint: str
    reference_fingerprint: str
    text: str  # "pydoc_data topics" or the file given
    tokens_scored: int
    max_length: int
    stride: int
    reference_perplexity: float
    perplexity: float
    perplexity_delta_pct: float
    retention_exact_match: float
    retention_token_agreement: float
    retention_prompts: int
    bits_per_weight: float  # stored bytes over every parameter (embeddings, head, norms): as a GGUF file counts
    cache_bytes: int
    original_bytes: int
    reduction_factor: float
    tensor_errors: dict[str, float] = field(default_factory=dict)  # summary: mean/max rel MSE, worst tensor
    quantize_seconds: float = 0.0
    max_accuracy_loss_pct: float | None = None
    passed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_summary(tensor_errors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    q = {n: e for n, e in tensor_errors.items() if e["codec"] != "raw"}
    if not q:
        return {"quantized_tensors": 0}
    worst = max(q, key=lambda n: q[n]["rel_mse"])
    return {
        "quantized_tensors": len(q),
        "mean_rel_mse": statistics.fmean(e["rel_mse"] for e in q.values()),
        "median_rel_mse": statistics.median(e["rel_mse"] for e in q.values()),
        "max_rel_mse": q[worst]["rel_mse"],
        "worst_tensor": worst,
        "max_abs_err": max(e["max_abs_err"] for e in q.values()),
    }


def validate(
    processor,
    *,
    text: str | None = None,
    text_name: str = "pydoc_data topics",
    max_tokens: int = 4096,
    max_length: int = 512,
    stride: int | None = None,
    retention_tokens: int = 24,
    max_accuracy_loss_pct: float | None = None,
) -> ValidationReport:
    """Measure ``processor``'s variant against the same model in mode ``none``.

    Args:
        processor: a :class:`~sli.processor.UniversalSLIProcessor` (quantizes if needed).
        text: evaluation text (default :func:`default_text`), scored on its first ``max_tokens`` tokens.
        max_accuracy_loss_pct: when given, ``passed`` says whether the perplexity increase stays within it.
    """
    from runtime.evaluate import perplexity, retention
    from sli.offline.config import QuantizationConfig
    from sli.processor import UniversalSLIProcessor

    report = processor.quantize()
    ref = UniversalSLIProcessor(
        processor.model_path, quantization_config=QuantizationConfig(mode="none"), cache_dir=processor.cache_dir,
        progress=processor.progress, memory_budget=processor.memory_budget, dtype=str(processor.dtype).removeprefix("torch."),
    )
    try:
        ref_report = ref.quantize()
        tok = processor.tokenizer
        ids = torch.tensor(tok(text if text is not None else default_text())["input_ids"][:max_tokens])
        stride = stride or max_length // 2
        got = perplexity(processor.model, ids, max_length=max_length, stride=stride)
        # the reference's figures depend only on its variant and the inputs: computed once per process
        key = (ref_report.variant_id, str(processor.dtype), hash(tuple(ids.tolist())), max_length, stride)
        if key not in _REFERENCE_PPL:
            _REFERENCE_PPL[key] = perplexity(ref.load(), ids, max_length=max_length, stride=stride)
        want = _REFERENCE_PPL[key]
        prompts = [torch.tensor(tok(p)["input_ids"]) for p in RETENTION_PROMPTS]
        ret = retention(processor.model, ref.load(), prompts, new_tokens=retention_tokens)
    finally:
        ref.close()
    delta = 100.0 * (got.perplexity / want.perplexity - 1.0)
    out = ValidationReport(
        model=str(processor.model_path),
        mode=report.quantization.get("mode", report.quantization.get("kind", "?")),
        model_fingerprint=processor.model.manifest.model_fingerprint,
        quant_fingerprint=processor.model.manifest.quant_fingerprint,
        reference_fingerprint=ref_report.variant_id,
        text=text_name,
        tokens_scored=got.tokens_scored,
        max_length=max_length,
        stride=stride,
        reference_perplexity=want.perplexity,
        perplexity=got.perplexity,
        perplexity_delta_pct=delta,
        retention_exact_match=ret.exact_match_share,
        retention_token_agreement=ret.token_agreement,
        retention_prompts=ret.prompts,
        bits_per_weight=report.bits_per_weight,
        cache_bytes=report.stored_bytes,
        original_bytes=report.original_bytes,
        reduction_factor=report.reduction_factor,
        tensor_errors=error_summary(report.tensor_errors),
        quantize_seconds=report.seconds,
        max_accuracy_loss_pct=max_accuracy_loss_pct,
        passed=None if max_accuracy_loss_pct is None else bool(delta <= max_accuracy_loss_pct and math.isfinite(delta)),
    )
    logger.info("perplexity %.3f vs reference %.3f (%+.2f%%)", out.perplexity, out.reference_perplexity, delta)
    return out


def describe_model(path) -> dict[str, Any]:
    """What a model folder or file is, if it is loadable: format, architecture, parameters, dtype.

    Raises:
        ModelSourceError: missing or malformed.
    """
    import math as _m

    from sli.offline.sources import open_source

    src = open_source(path)
    try:
        names = src.tensor_names()
        params = 0
        dtypes: dict[str, int] = {}
        for n in names:
            shape, dt = src.tensor_meta(n)
            params += _m.prod(shape)
            dtypes[dt] = dtypes.get(dt, 0) + 1
        cfg = src.config
        return {
            "path": str(src.path),
            "format": src.format,
            "model_type": cfg.model_type,
            "architectures": getattr(cfg, "architectures", None),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "parameters": params,
            "tensors": len(names),
            "dtypes": dtypes,
            "disk_bytes": src.disk_bytes,
        }
    finally:
        src.close()
