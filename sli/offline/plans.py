"""Named plans: the presets, the class-level `QuantizationRegistry`, plans from names and
from stored dicts, and the one compute dtype a streamed model runs in."""

from __future__ import annotations

import copy
from typing import Any

import torch

from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.config import COMPUTE_DTYPES, DEFAULT_SKIP_MODULES, QuantizationConfig, QuantizationMode, dtype_str, parse_dtype


def plan_from_dict(d: dict[str, Any]) -> QuantizationConfig | AdaptiveQuantizer:
    """Rebuild a plan stored in a manifest."""
    return AdaptiveQuantizer.from_dict(d) if d.get("kind") == "adaptive" else QuantizationConfig.from_dict(d)


def plan_compute_dtypes(plan: QuantizationConfig | AdaptiveQuantizer) -> set:
    """The compute dtypes a plan sets (None where a part leaves it unset)."""
    if isinstance(plan, QuantizationConfig):
        return {plan.compute_dtype}
    return {p.compute_dtype if p.compute_dtype is not None else plan.compute_dtype for p in plan.parts()}


def streaming_compute_dtype(
    plan: QuantizationConfig | AdaptiveQuantizer, processor_dtype: str | torch.dtype | None, source_dtype: torch.dtype
) -> torch.dtype:
    """The one dtype a streamed model computes in: the processor's ``dtype`` (default float32)
    unless the plan sets a compute dtype; ``"auto"`` is the source's dtype.

    Raises:
        ValueError: the plan's parts ask for different compute dtypes, or the processor's
            ``dtype`` and the plan's ``compute_dtype`` disagree.
    """
    asked = plan_compute_dtypes(plan)
    if len(asked) > 1:
        names = sorted(str(dtype_str(a)) for a in asked)
        raise ValueError(
            f"this plan asks for several compute dtypes ({', '.join(names)}), but a streamed model computes every "
            "module in one; set compute_dtype on the AdaptiveQuantizer only (or on no part)"
        )
    plan_dtype = next(iter(asked))
    proc = None if processor_dtype is None else (processor_dtype if processor_dtype == "auto" else parse_dtype(processor_dtype, COMPUTE_DTYPES, "dtype"))

    def resolve(v):
        return source_dtype if v == "auto" else v

    if plan_dtype is not None and proc is not None and resolve(plan_dtype) != resolve(proc):
        raise ValueError(
            f"the processor's dtype={dtype_str(proc)} contradicts the quantization config's compute_dtype="
            f"{dtype_str(plan_dtype)}; give one of them (the config's applies when the processor's is left unset)"
        )
    chosen = plan_dtype if plan_dtype is not None else (proc if proc is not None else torch.float32)
    return resolve(chosen)


# -- presets -------------------------------------------------------------------------------
def get_int8_config(**overrides: Any) -> QuantizationConfig:
    """LLM.int8 with the head and embeddings skipped."""
    overrides.setdefault("llm_int8_skip_modules", list(DEFAULT_SKIP_MODULES))
    return QuantizationConfig(mode=QuantizationMode.INT8, **overrides)


def get_nf4_config(**overrides: Any) -> QuantizationConfig:
    """NF4 with double quantization."""
    overrides.setdefault("double_quant", True)
    return QuantizationConfig(mode=QuantizationMode.NF4, **overrides)


def get_fp4_config(**overrides: Any) -> QuantizationConfig:
    return QuantizationConfig(mode=QuantizationMode.FP4, **overrides)


def get_mixed_precision_config(**overrides: Any) -> AdaptiveQuantizer:
    """Attention INT8, FFN NF4 (and other layers NF4; the head and embeddings kept)."""
    overrides.setdefault("base_config", get_nf4_config())
    overrides.setdefault("attention_config", get_int8_config())
    return AdaptiveQuantizer(**overrides)


def _builtin_plans() -> dict[str, QuantizationConfig | AdaptiveQuantizer]:
    return {"int8": get_int8_config(), "nf4": get_nf4_config(), "fp4": get_fp4_config()}


class QuantizationRegistry:
    """Named plans, shared by the whole process (class-level): ``int8``, ``nf4`` and ``fp4``
    are there from the start, in that order, then what users register. ``get`` returns a
    copy, so callers may change what they get."""

    _plans: dict[str, QuantizationConfig | AdaptiveQuantizer] = _builtin_plans()

    @classmethod
    def register(cls, name: str, plan: QuantizationConfig | AdaptiveQuantizer, *, overwrite: bool = False) -> None:
        if not isinstance(plan, (QuantizationConfig, AdaptiveQuantizer)):
            raise TypeError(f"register a QuantizationConfig or an AdaptiveQuantizer, got {type(plan).__name__}")
        if name in cls._plans and not overwrite:
            raise ValueError(f"a quantization config named {name!r} is already registered; pass overwrite=True")
        cls._plans[name] = copy.deepcopy(plan)

    @classmethod
    def unregister(cls, name: str) -> None:
        cls._plans.pop(name, None)

    @classmethod
    def get(cls, name: str) -> QuantizationConfig | AdaptiveQuantizer:
        try:
            return copy.deepcopy(cls._plans[name])
        except KeyError:
            raise KeyError(f"no quantization config named {name!r}; registered: {cls.list_configs()}") from None

    @classmethod
    def list_configs(cls) -> list[str]:
        return list(cls._plans)

    @classmethod
    def reset(cls) -> None:
        """Back to the built-in presets only."""
        cls._plans = _builtin_plans()


def resolve_plan(name: str) -> QuantizationConfig | AdaptiveQuantizer:
    """A plan from a name: a registered one, else a mode (``"int4"``: that mode, default
    options), else ``"mixed"`` (:func:`get_mixed_precision_config`).

    Raises:
        KeyError: none of these.
    """
    if name in QuantizationRegistry._plans:
        return QuantizationRegistry.get(name)
    if name in {m.value for m in QuantizationMode}:
        return QuantizationConfig(mode=QuantizationMode(name))
    if name == "mixed":
        return get_mixed_precision_config()
    raise KeyError(
        f"no quantization named {name!r}: not registered ({QuantizationRegistry.list_configs()}), "
        f"not a mode ({[m.value for m in QuantizationMode]}), not 'mixed'"
    )
