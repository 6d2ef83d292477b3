"""Quantization configuration: modes, the `QuantizationConfig` dataclass, mixed precision
(`AdaptiveQuantizer`), presets, and the `QuantizationRegistry`.

A *plan* (a config or an adaptive quantizer) answers one question per tensor: which codec,
with which parameters, or keep it unquantized. Norms, biases, 1-D tensors and skipped
modules are always kept (in the compute dtype).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch

from cache.codecs import CodecName

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantizationMode(str, Enum):
    """How linear weights are stored."""

    NONE = "none"  # keep bf16 / fp16 / fp32
    INT8 = "int8"  # LLM.int8: int8 rows + scales, outlier columns in 16-bit
    INT8_DYNAMIC = "int8_dynamic"  # per-channel int8 for torch's int8 CPU matmul
    NF4 = "nf4"  # bitsandbytes NormalFloat4, blocksize 64
    FP4 = "fp4"  # bitsandbytes FP4, blocksize 64
    INT4 = "int4"  # group-wise asymmetric 4-bit
    INT2 = "int2"  # group-wise asymmetric 2-bit (experimental)


_MODE_CODEC = {
    QuantizationMode.NONE: CodecName.RAW,
    QuantizationMode.INT8: CodecName.INT8_OUTLIER,
    QuantizationMode.INT8_DYNAMIC: CodecName.INT8_CHANNEL,
    QuantizationMode.NF4: CodecName.NF4,
    QuantizationMode.FP4: CodecName.FP4,
    QuantizationMode.INT4: CodecName.INT4_GROUP,
    QuantizationMode.INT2: CodecName.INT2_GROUP,
}

DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class CodecChoice:
    """What to do with one tensor: a codec and its encode parameters."""

    codec: CodecName
    params: dict[str, Any] = field(default_factory=dict)


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def module_matches(module_name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when a pattern names a dotted run of components of ``module_name``
    (``"lm_head"`` matches ``lm_head``; ``"self_attn"`` matches ``model.layers.3.self_attn.q_proj``)."""
    padded = "." + module_name + "."
    return any(("." + p.strip(".") + ".") in padded for p in patterns if p)


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Only 2-D floating weights are quantized; norms, biases and buffers stay as they are."""
    return name.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point()


class QuantizationPlan(Protocol):
    """Anything that picks a codec per tensor and can be stored in a manifest."""

    compute_dtype: str

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice: ...

    def to_dict(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...


@dataclass
class QuantizationConfig:
    """One quantization mode for every quantizable tensor.

    Attributes:
        mode: how linear weights are stored.
        compute_dtype: dtype of kept tensors and of dequantized weights; ``"auto"`` keeps the source dtype.
        double_quant: bitsandbytes double quantization of the 4-bit absmax statistics.
        compress_statistics: bitsandbytes' name for ``double_quant``; must agree with it when given.
        quant_storage_dtype: storage dtype of packed 4-bit data (bitsandbytes ``quant_storage``).
        quant_type: ``"nf4"``/``"fp4"`` for the 4-bit modes; derived from ``mode``.
        llm_int8_threshold: int8 mode: weight columns with any magnitude at or above this stay in 16-bit.
        llm_int8_skip_modules: modules never quantized (dotted names or name components).
        group_size: int4/int2 group size along the input dimension.
        blocksize: nf4/fp4 block size.
    """

    mode: QuantizationMode = QuantizationMode.NF4
    compute_dtype: str = "auto"
    double_quant: bool = True
    compress_statistics: bool | None = None
    quant_storage_dtype: str = "uint8"
    quant_type: str | None = None
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))
    group_size: int = 64
    blocksize: int = 64

    def __post_init__(self) -> None:
        try:
            self.mode = QuantizationMode(self.mode)
        except ValueError:
            raise ValueError(
                f"unknown quantization mode {self.mode!r}; choose one of {[m.value for m in QuantizationMode]}"
            ) from None
        if self.compute_dtype != "auto" and self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
        if self.compress_statistics is None:
            self.compress_statistics = self.double_quant
        elif self.compress_statistics != self.double_quant:
            raise ValueError(
                f"compress_statistics={self.compress_statistics} contradicts double_quant={self.double_quant}; "
                "they are the same bitsandbytes option, set one"
            )
        four_bit = self.mode in (QuantizationMode.NF4, QuantizationMode.FP4)
        if self.quant_type is None:
            self.quant_type = self.mode.value if four_bit else None
        elif not four_bit or self.quant_type != self.mode.value:
            raise ValueError(f"quant_type={self.quant_type!r} does not fit mode {self.mode.value!r}")
        if self.quant_storage_dtype not in ("uint8", "int8", "bfloat16", "float16", "float32"):
            raise ValueError(f"quant_storage_dtype {self.quant_storage_dtype!r} is not a bitsandbytes storage dtype")
        if self.group_size <= 0 or self.group_size % 4:
            raise ValueError(f"group_size must be a positive multiple of 4, got {self.group_size}")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two from 64 to 4096, got {self.blocksize}")
        if self.llm_int8_threshold < 0:
            raise ValueError(f"llm_int8_threshold must be >= 0, got {self.llm_int8_threshold}")
        self.llm_int8_skip_modules = list(self.llm_int8_skip_modules or [])

    # -- plan --------------------------------------------------------------------------
    def torch_compute_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        return source_dtype if self.compute_dtype == "auto" else _DTYPES[self.compute_dtype]

    def codec_choice(self) -> CodecChoice:
        """The codec this mode applies to a quantizable tensor."""
        codec = _MODE_CODEC[self.mode]
        if codec is CodecName.INT8_OUTLIER:
            return CodecChoice(codec, {"threshold": self.llm_int8_threshold})
        if codec in (CodecName.NF4, CodecName.FP4):
            storage = getattr(torch, self.quant_storage_dtype)
            return CodecChoice(codec, {"blocksize": self.blocksize, "double_quant": self.double_quant, "quant_storage": storage})
        if codec in (CodecName.INT4_GROUP, CodecName.INT2_GROUP):
            return CodecChoice(codec, {"group_size": self.group_size})
        return CodecChoice(codec, {})

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice:
        module = name.rsplit(".", 1)[0]
        if self.mode is QuantizationMode.NONE or not is_quantizable(name, tensor):
            return CodecChoice(CodecName.RAW)
        if module_matches(module, self.llm_int8_skip_modules):
            return CodecChoice(CodecName.RAW)
        return self.codec_choice()

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mode"] = self.mode.value
        d["kind"] = "config"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        """Build from a dict; unknown keys are an error, never dropped."""
        d = {k: v for k, v in d.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantizationConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())


ATTENTION_MARKERS = ("self_attn", "attention", "attn")
FFN_MARKERS = ("mlp", "feed_forward", "ffn", "experts")


@dataclass
class AdaptiveQuantizer:
    """Per-module mixed precision: attention, feed-forward and other weights each get a config.

    Attention projections usually matter more for quality than FFN weights, so the default
    keeps attention in INT8 and FFN in NF4; other 2-D weights (embeddings, head) follow
    ``default`` unless skipped.
    """

    attention: QuantizationConfig = field(default_factory=lambda: QuantizationConfig(QuantizationMode.INT8))
    ffn: QuantizationConfig = field(default_factory=lambda: QuantizationConfig(QuantizationMode.NF4))
    default: QuantizationConfig = field(default_factory=lambda: QuantizationConfig(QuantizationMode.NONE))
    skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))
    compute_dtype: str = "auto"
    # exact tensor name -> config; chosen per tensor by measurement (see sli.salience)
    overrides: dict[str, QuantizationConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in (self.attention, self.ffn, self.default, *self.overrides.values()):
            if part.compute_dtype != self.compute_dtype:
                part.compute_dtype = self.compute_dtype
                part.__post_init__()

    def torch_compute_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        return self.default.torch_compute_dtype(source_dtype)

    def config_for(self, name: str) -> QuantizationConfig:
        """The config that applies to a tensor: its override, else by the module it belongs to."""
        if name in self.overrides:
            return self.overrides[name]
        module = name.rsplit(".", 1)[0]
        if module_matches(module, ATTENTION_MARKERS):
            return self.attention
        if module_matches(module, FFN_MARKERS):
            return self.ffn
        return self.default

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice:
        if not is_quantizable(name, tensor) or module_matches(name.rsplit(".", 1)[0], self.skip_modules):
            return CodecChoice(CodecName.RAW)
        cfg = self.config_for(name)
        if cfg.mode is QuantizationMode.NONE:
            return CodecChoice(CodecName.RAW)
        return cfg.codec_choice()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "adaptive",
            "attention": self.attention.to_dict(),
            "ffn": self.ffn.to_dict(),
            "default": self.default.to_dict(),
            "skip_modules": list(self.skip_modules),
            "compute_dtype": self.compute_dtype,
            **({"overrides": {k: v.to_dict() for k, v in sorted(self.overrides.items())}} if self.overrides else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdaptiveQuantizer":
        d = {k: v for k, v in d.items() if k != "kind"}
        known = {"attention", "ffn", "default", "skip_modules", "compute_dtype", "overrides"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdaptiveQuantizer keys {unknown}; known: {sorted(known)}")
        for k in ("attention", "ffn", "default"):
            if k in d:
                d[k] = QuantizationConfig.from_dict(d[k])
        if "overrides" in d:
            d["overrides"] = {k: QuantizationConfig.from_dict(v) for k, v in d["overrides"].items()}
        return cls(**d)

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())


def plan_from_dict(d: dict[str, Any]) -> QuantizationConfig | AdaptiveQuantizer:
    """Rebuild a plan stored in a manifest."""
    return AdaptiveQuantizer.from_dict(d) if d.get("kind") == "adaptive" else QuantizationConfig.from_dict(d)


# -- presets -------------------------------------------------------------------------------
def get_int8_config(**overrides: Any) -> QuantizationConfig:
    return QuantizationConfig(mode=QuantizationMode.INT8, **overrides)


def get_nf4_config(**overrides: Any) -> QuantizationConfig:
    return QuantizationConfig(mode=QuantizationMode.NF4, **overrides)


def get_fp4_config(**overrides: Any) -> QuantizationConfig:
    return QuantizationConfig(mode=QuantizationMode.FP4, **overrides)


def get_mixed_precision_config(**overrides: Any) -> AdaptiveQuantizer:
    """Attention INT8, FFN NF4, everything else kept (the base)."""
    return AdaptiveQuantizer(**overrides)


class QuantizationRegistry:
    """Named plans. ``get`` returns a copy, so callers may modify what they get."""

    def __init__(self) -> None:
        self._plans: dict[str, QuantizationConfig | AdaptiveQuantizer] = {}

    def register(self, name: str, plan: QuantizationConfig | AdaptiveQuantizer, *, overwrite: bool = False) -> None:
        if name in self._plans and not overwrite:
            raise ValueError(f"a quantization config named {name!r} is already registered; pass overwrite=True")
        self._plans[name] = plan

    def get(self, name: str) -> QuantizationConfig | AdaptiveQuantizer:
        try:
            return copy.deepcopy(self._plans[name])
        except KeyError:
            raise KeyError(f"no quantization config named {name!r}; registered: {self.list_configs()}") from None

    def list_configs(self) -> list[str]:
        return sorted(self._plans)


def default_registry() -> QuantizationRegistry:
    """A registry holding one preset per mode plus ``mixed`` (attention INT8, FFN NF4)."""
    reg = QuantizationRegistry()
    for mode in QuantizationMode:
        reg.register(mode.value, QuantizationConfig(mode=mode))
    reg.register("mixed", get_mixed_precision_config())
    return reg
