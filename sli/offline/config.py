"""Quantization configuration: modes, the `QuantizationConfig` dataclass, mixed precision
(`AdaptiveQuantizer`), presets, and the class-level `QuantizationRegistry`.

A *plan* (a config or an adaptive quantizer) answers one question per tensor: which codec,
with which parameters, or keep it unquantized. Norms, biases, 1-D tensors and skipped
modules are always kept, in the source's dtype.

The compute dtype, one rule everywhere:

- the processor's ``dtype`` is the default for every module;
- a config's ``compute_dtype`` overrides it for the modules that config applies to (in an
  :class:`AdaptiveQuantizer`, its own ``compute_dtype`` is the default of its parts);
- ``"auto"`` means the source's dtype; ``None`` (the default) means "not set here";
- used alone (``LayerQuantizer``, ``quantize_layer``), an unset compute dtype is float16,
  the documented default;
- a streamed model computes in one dtype, so a plan whose parts ask for different ones, or
  a processor ``dtype`` given together with a different ``compute_dtype``, is refused
  (:func:`streaming_compute_dtype`).

The compute dtype changes nothing in the cache (records keep the source's dtype), so it is
not part of a plan's fingerprint: one cache serves every compute dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch

from cache.codecs import CodecName
from sli.offline.calibration import CalibrationConfig

COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(value: Any, allowed: dict[str, torch.dtype], what: str) -> torch.dtype:
    """A torch dtype from a dtype or its name (``torch.float16``, ``"torch.float16"``, ``"float16"``)."""
    if isinstance(value, torch.dtype) and value in allowed.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in allowed:
        return allowed[value.removeprefix("torch.")]
    raise ValueError(f"{what} must be one of {['torch.' + k for k in allowed]}, got {value!r}")


def dtype_str(dtype: torch.dtype | str | None) -> str | None:
    """How dtypes are written in dicts and JSON: ``'torch.float16'`` (``'auto'`` and None as they are)."""
    return str(dtype) if isinstance(dtype, torch.dtype) else dtype


_VOCAB_MODES = ("int8", "int4", "none")


class QuantizationMode(str, Enum):
    """How linear weights are stored."""

    NONE = "none"  # keep bf16 / fp16 / fp32
    INT8 = "int8"  # LLM.int8: int8 rows + scales, outlier columns in 16-bit
    INT8_DYNAMIC = "int8_dynamic"  # per-channel int8 for torch's int8 CPU matmul
    NF4 = "nf4"  # bitsandbytes NormalFloat4, blocksize 64
    FP4 = "fp4"  # bitsandbytes FP4, blocksize 64
    INT4 = "int4"  # group-wise 4-bit (asymmetric, integer zero point; or symmetric)
    INT3 = "int3"  # group-wise 3-bit (for calibrated and loss-targeted plans)
    INT2 = "int2"  # group-wise 2-bit (experimental)


_MODE_CODEC = {
    QuantizationMode.NONE: CodecName.RAW,
    QuantizationMode.INT8: CodecName.INT8_OUTLIER,
    QuantizationMode.INT8_DYNAMIC: CodecName.INT8_CHANNEL,
    QuantizationMode.NF4: CodecName.NF4,
    QuantizationMode.FP4: CodecName.FP4,
    QuantizationMode.INT4: CodecName.INT4_GROUP,
    QuantizationMode.INT3: CodecName.INT3_GROUP,
    QuantizationMode.INT2: CodecName.INT2_GROUP,
}

GROUP_CODECS = (CodecName.INT4_GROUP, CodecName.INT3_GROUP, CodecName.INT2_GROUP)
GROUP_BITS = {CodecName.INT4_GROUP: 4, CodecName.INT3_GROUP: 3, CodecName.INT2_GROUP: 2}


class ChannelOrder(str, Enum):
    """How a group codec orders a weight's input channels before grouping (see :mod:`cache.codecs`)."""

    NONE = "none"  # as they are
    WEIGHT = "weight"  # by decreasing L2 norm of the weight's columns
    ACTIVATION = "activation"  # by decreasing calibration activation scale (needs calibration)


# The vocabulary-sized matrices: the output head and the token embeddings. They are stored as
# rows (each row decodes alone: embeddings are looked up by row, the head applied by chunks),
# with their own codec (``vocab_mode``), and kept in 16 bits only when named in the skip list.
VOCAB_MODULES = ("lm_head", "embed_tokens")
# The skip list of the int8 preset (``get_int8_config``: "standard INT8 with skip modules")
DEFAULT_SKIP_MODULES = VOCAB_MODULES
# The vocabulary codec of a quantized mode when ``vocab_mode`` is unset: int8 rows with bf16
# scales. Measured on the real model (perplexity on 2,048 held-out tokens, decoder layers in
# fp32 / int4 groups of 32): int8 rows +0.06% / +0.05% against keeping them in 16 bits; int4
# rows in groups of 32 +5.0%, 64 +8.1%, 128 +13.3%.
DEFAULT_VOCAB_MODE = "int8"


@dataclass(frozen=True)
class CodecChoice:
    """What to do with one tensor: a codec and its encode parameters."""

    codec: CodecName
    params: dict[str, Any] = field(default_factory=dict)


def _choice_dict(c: CodecChoice) -> dict[str, Any]:
    return {"codec": c.codec.value, "params": {k: dtype_str(v) for k, v in sorted(c.params.items())}}


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_without_compute_dtype(d), sort_keys=True).encode()).hexdigest()[:16]


def _without_compute_dtype(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_compute_dtype(v) for k, v in d.items() if k != "compute_dtype"}
    return d


def module_matches(module_name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when a pattern names a dotted run of components of ``module_name``
    (``"lm_head"`` matches ``lm_head``; ``"self_attn"`` matches ``model.layers.3.self_attn.q_proj``)."""
    padded = "." + module_name + "."
    return any(("." + p.strip(".") + ".") in padded for p in patterns if p)


def is_vocab(module_name: str) -> bool:
    """The output head or the token embeddings (:data:`VOCAB_MODULES`)."""
    return module_matches(module_name, VOCAB_MODULES)


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Only 2-D floating weights are quantized; norms, biases and buffers stay as they are."""
    return (name == "weight" or name.endswith(".weight")) and tensor.ndim == 2 and tensor.is_floating_point()


class QuantizationPlan(Protocol):
    """Anything that picks a codec per tensor and can be stored in a manifest."""

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice: ...

    def compute_dtype_for(self, name: str) -> torch.dtype | str | None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...


def _check_compute_dtype(value: Any) -> torch.dtype | str | None:
    if value is None or value == "auto":
        return value
    return parse_dtype(value, COMPUTE_DTYPES, "compute_dtype ('auto', None or a dtype)")


@dataclass
class QuantizationConfig:
    """One quantization mode for every quantizable tensor.

    Attributes:
        mode: how linear weights are stored (default ``NONE``).
        compute_dtype: dtype the modules compute in, not the storage dtype: a ``torch.dtype``
            (or its name), ``"auto"`` (the source's dtype) or None (not set: the processor's
            ``dtype``; float16 when used alone). See the module docstring for the rule.
        compress_statistics: bitsandbytes double quantization of the 4-bit absmax statistics.
        quant_storage_dtype: storage dtype of packed 4-bit data (bitsandbytes ``quant_storage``).
        double_quant: the same option under its other name; must agree with ``compress_statistics``.
        quant_type: ``"nf4"``/``"fp4"`` for the 4-bit modes; derived from ``mode``.
        llm_int8_threshold: int8 mode: weight columns with any magnitude at or above this stay in 16-bit.
        llm_int8_skip_modules: modules never quantized (dotted names or name components). None
            (the default) skips nothing; name ``lm_head`` and ``embed_tokens`` here to keep the
            head and the token embeddings in 16 bits.
        group_size: int4/int3/int2 group size along the input dimension (a width that is not
            a multiple of it ends in one narrower group, padded when encoded).
        blocksize: nf4/fp4 block size.
        symmetric: int4/int3/int2: a symmetric grid (codes -8..7 times a scale, for 4 bits)
            instead of the asymmetric one with an integer zero point.
        permute: int4/int3/int2: order input channels before grouping (:class:`ChannelOrder`:
            ``"none"``, ``"weight"`` L2 norm, ``"activation"`` scale, which needs calibration).
        calibration: quantize with calibration text (:class:`~sli.offline.calibration.CalibrationConfig`:
            GPTQ, AWQ or both); None: round to nearest.
        vocab_mode: how the head and the token embeddings are stored, as rows: ``INT8`` (int8
            per row, bf16 scales), ``INT4`` (int4 groups of ``group_size`` per row) or ``NONE``
            (16 bits); None: int8 rows in every quantized mode (:data:`DEFAULT_VOCAB_MODE`),
            kept in mode ``NONE``. A name in the skip list keeps them whatever this says.
    """

    mode: QuantizationMode = QuantizationMode.NONE
    compute_dtype: torch.dtype | str | None = None
    compress_statistics: bool | None = None
    quant_storage_dtype: torch.dtype | str = torch.uint8
    double_quant: bool | None = None
    quant_type: str | None = None
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    group_size: int = 64
    blocksize: int = 64
    symmetric: bool = False
    permute: ChannelOrder | str = ChannelOrder.NONE
    calibration: CalibrationConfig | dict | None = None
    vocab_mode: QuantizationMode | str | None = None

    def __post_init__(self) -> None:
        try:
            self.mode = QuantizationMode(self.mode)
        except ValueError:
            raise ValueError(
                f"unknown quantization mode {self.mode!r}; choose one of {[m.value for m in QuantizationMode]}"
            ) from None
        self.compute_dtype = _check_compute_dtype(self.compute_dtype)
        if self.compress_statistics is None and self.double_quant is None:
            self.compress_statistics = self.double_quant = True
        elif self.compress_statistics is None or self.double_quant is None:
            self.compress_statistics = self.double_quant = bool(
                self.double_quant if self.compress_statistics is None else self.compress_statistics
            )
        four_bit = self.mode in (QuantizationMode.NF4, QuantizationMode.FP4)
        if self.quant_type is None:
            self.quant_type = self.mode.value if four_bit else None
        elif not four_bit or self.quant_type != self.mode.value:
            raise ValueError(
                f"quant_type={self.quant_type!r} does not fit mode {self.mode.value!r}; the 4-bit type is the mode "
                "(QuantizationMode.NF4 or QuantizationMode.FP4)"
            )
        self.quant_storage_dtype = parse_dtype(self.quant_storage_dtype, _STORAGE_DTYPES, "quant_storage_dtype")
        if self.group_size <= 0 or self.group_size % 4:
            raise ValueError(f"group_size must be a positive multiple of 4, got {self.group_size}")
        if self.mode is QuantizationMode.INT3 and self.group_size % 8:
            raise ValueError(f"int3 packs 8 codes in 3 bytes: group_size must be a multiple of 8, got {self.group_size}")
        try:
            self.permute = ChannelOrder(self.permute)
        except ValueError:
            raise ValueError(f"unknown permute {self.permute!r}; choose one of {[o.value for o in ChannelOrder]}") from None
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        if self.permute is ChannelOrder.ACTIVATION and self.calibration is None:
            raise ValueError("permute='activation' orders channels by calibration activation scale: give calibration= "
                             "(--calibrate), or permute='weight'")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two from 64 to 4096, got {self.blocksize}")
        if self.vocab_mode is not None:
            try:
                self.vocab_mode = QuantizationMode(self.vocab_mode)
            except ValueError:
                raise ValueError(f"unknown vocab_mode {self.vocab_mode!r}; choose one of {_VOCAB_MODES}") from None
            if self.vocab_mode.value not in _VOCAB_MODES:
                raise ValueError(
                    f"vocab_mode {self.vocab_mode.value!r} does not store rows that decode alone; choose one of {_VOCAB_MODES}"
                )
        self._check_mutable()
        if self.llm_int8_skip_modules is not None:
            self.llm_int8_skip_modules = list(self.llm_int8_skip_modules)

    def _check_mutable(self) -> None:
        """The fields users set after construction (the document does): checked where they are used."""
        if self.compress_statistics != self.double_quant:
            raise ValueError(
                f"compress_statistics={self.compress_statistics} contradicts double_quant={self.double_quant}; "
                "they are the same bitsandbytes option, set one"
            )
        if self.llm_int8_threshold < 0:
            raise ValueError(f"llm_int8_threshold must be >= 0, got {self.llm_int8_threshold}")

    @property
    def skip_modules(self) -> list[str]:
        """The modules kept unquantized (``llm_int8_skip_modules``; None skips nothing)."""
        return [] if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules)

    @property
    def effective_calibration(self) -> CalibrationConfig | None:
        """The calibration this plan quantizes with (None: round to nearest)."""
        return self.calibration

    # -- plan --------------------------------------------------------------------------
    def compute_dtype_for(self, name: str) -> torch.dtype | str | None:
        return self.compute_dtype

    def codec_choice(self) -> CodecChoice:
        """The codec this mode applies to a quantizable tensor."""
        self._check_mutable()
        codec = _MODE_CODEC[self.mode]
        if codec is CodecName.INT8_OUTLIER:
            return CodecChoice(codec, {"threshold": self.llm_int8_threshold})
        if codec in (CodecName.NF4, CodecName.FP4):
            return CodecChoice(codec, {"blocksize": self.blocksize, "double_quant": self.compress_statistics,
                                       "quant_storage": self.quant_storage_dtype})
        if codec in GROUP_CODECS:
            params: dict[str, Any] = {"group_size": self.group_size}
            if self.symmetric:
                params["symmetric"] = True
            if self.permute is not ChannelOrder.NONE:
                params["permute"] = self.permute.value
            return CodecChoice(codec, params)
        return CodecChoice(codec, {})

    def vocab_choice(self) -> CodecChoice:
        """The codec of the head and the token embeddings (rows that decode alone)."""
        mode = self.vocab_mode
        if mode is None:
            mode = QuantizationMode.NONE if self.mode is QuantizationMode.NONE else QuantizationMode(DEFAULT_VOCAB_MODE)
        if mode is QuantizationMode.NONE:
            return CodecChoice(CodecName.RAW)
        if mode is QuantizationMode.INT4:
            return CodecChoice(CodecName.INT4_GROUP, {"group_size": self.group_size})
        return CodecChoice(CodecName.INT8_CHANNEL, {"scale_dtype": torch.bfloat16})

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice:
        module = name.rsplit(".", 1)[0]
        if not is_quantizable(name, tensor) or module_matches(module, self.skip_modules):
            return CodecChoice(CodecName.RAW)
        if is_vocab(module):
            return self.vocab_choice()
        if self.mode is QuantizationMode.NONE:
            return CodecChoice(CodecName.RAW)
        return self.codec_choice()

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{'mode': 'int8', 'compute_dtype': 'torch.float16', ...}``."""
        d = dataclasses.asdict(self)
        d["mode"] = self.mode.value
        d["compute_dtype"] = dtype_str(self.compute_dtype)
        d["quant_storage_dtype"] = dtype_str(self.quant_storage_dtype)
        d["permute"] = self.permute.value
        d["calibration"] = self.calibration.to_dict() if self.calibration is not None else None
        d["vocab_mode"] = None if self.vocab_mode is None else self.vocab_mode.value
        d["kind"] = "config"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        """Build from a dict (as :meth:`to_dict` or JSON gives it); unknown keys are an error, never dropped."""
        d = {k: v for k, v in d.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantizationConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def canonical_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the defaults spelled out (None and what it means are one plan) and
        the calibration as its fingerprint sees it (the text by its hash, not its path)."""
        d = {**self.to_dict(), "llm_int8_skip_modules": self.skip_modules, "vocab_codec": _choice_dict(self.vocab_choice())}
        del d["vocab_mode"]  # the codec it resolves to stands for it
        if self.calibration is not None:
            d["calibration"] = self.calibration.fingerprint_dict()
        return d

    def fingerprint(self) -> str:
        """What the cache depends on (everything but the compute dtype)."""
        return _fingerprint(self.canonical_dict())
