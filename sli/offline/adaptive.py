"""`AdaptiveQuantizer`: mixed precision by module, attention one step more precise than the rest.

Layer types come from module names (the document's substrings); a part's ``compute_dtype``
overrides the adaptive one's for its modules (the rule is in :mod:`sli.offline.config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from cache.codecs import CodecName
from sli.offline.calibration import CalibrationConfig
from sli.offline.config import (
    CodecChoice,
    QuantizationConfig,
    QuantizationMode,
    _check_compute_dtype,
    _fingerprint,
    dtype_str,
    is_quantizable,
    is_vocab,
    module_matches,
)

# the document's name-based layer typing: substrings of the lower-cased module name
ATTENTION_MARKERS = ("attn", "attention", "query", "key", "value", "qkv")
FFN_MARKERS = ("ffn", "mlp", "feedforward", "fc")

# one step up in precision, for the attention layers of an adaptive plan
PRECISION_UPGRADE = {
    QuantizationMode.INT2: QuantizationMode.INT8,
    QuantizationMode.INT3: QuantizationMode.INT8,
    QuantizationMode.INT4: QuantizationMode.INT8,
    QuantizationMode.FP4: QuantizationMode.INT8,
    QuantizationMode.NF4: QuantizationMode.INT8,
    QuantizationMode.INT8: QuantizationMode.INT8_DYNAMIC,
    QuantizationMode.INT8_DYNAMIC: QuantizationMode.NONE,
    QuantizationMode.NONE: QuantizationMode.NONE,
}


def layer_type(name: str) -> str:
    """``"attention"``, ``"ffn"`` or ``"other"``, from a module's name."""
    low = name.lower()
    if any(x in low for x in ATTENTION_MARKERS):
        return "attention"
    if any(x in low for x in FFN_MARKERS):
        return "ffn"
    return "other"


@dataclass
class AdaptiveQuantizer:
    """Per-module mixed precision: attention, feed-forward and other weights each get a config.

    Attention projections usually matter more for quality than FFN weights. With only
    ``base_config`` given, attention gets one step more precision (NF4/FP4/INT4 -> INT8 ->
    INT8_DYNAMIC -> NONE) and FFN and other layers the base. Layer types come from the
    module name (:func:`layer_type`).

    Args:
        base_config: for layers neither attention nor FFN (and the default of the others); default NF4.
            An ``AdaptiveQuantizer`` given here is copied.
        attention_config: for attention layers; default: the base one step up.
        ffn_config: for FFN layers; default: the base.
        skip_modules: modules kept unquantized for every part; None: each part's own skip list.
        compute_dtype: the default compute dtype of the parts (a part's own overrides it).
        overrides: exact tensor name -> config, chosen per tensor by measurement (see :mod:`sli.offline.salience`).
        calibration: calibrated quantization for the whole plan (its parts' own ``calibration``,
            if any, must be the same).
        planned: what a measured plan was made for and reached (``target_bits``/``target_loss``
            and the figures), kept with the plan and shown by ``sli inspect``.
    """

    base_config: QuantizationConfig | None = None
    attention_config: QuantizationConfig | None = None
    ffn_config: QuantizationConfig | None = None
    skip_modules: list[str] | None = None
    compute_dtype: torch.dtype | str | None = None
    overrides: dict[str, QuantizationConfig] = field(default_factory=dict)
    calibration: CalibrationConfig | dict | None = None
    planned: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.base_config, AdaptiveQuantizer):  # AdaptiveQuantizer(get_mixed_precision_config())
            other = copy.deepcopy(self.base_config)
            for f in dataclasses.fields(self):
                if f.name != "base_config" and getattr(self, f.name) not in (None, {}):
                    raise ValueError(f"AdaptiveQuantizer(<AdaptiveQuantizer>, {f.name}=...) is ambiguous; pass configs only")
                setattr(self, f.name, getattr(other, f.name))
            self.base_config = other.base_config
            return
        self.compute_dtype = _check_compute_dtype(self.compute_dtype)
        if self.base_config is None:
            self.base_config = QuantizationConfig(mode=QuantizationMode.NF4)
        if self.attention_config is None:
            self.attention_config = dataclasses.replace(self.base_config, mode=PRECISION_UPGRADE[self.base_config.mode], quant_type=None)
        if self.ffn_config is None:
            self.ffn_config = self.base_config
        if self.skip_modules is not None:
            self.skip_modules = list(self.skip_modules)
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        own = {json.dumps(p.calibration.fingerprint_dict(), sort_keys=True) for p in self.parts() if p.calibration is not None}
        if self.calibration is not None:
            own.add(json.dumps(self.calibration.fingerprint_dict(), sort_keys=True))
        if len(own) > 1:
            raise ValueError("the parts of this AdaptiveQuantizer ask for different calibrations; a model is calibrated once: "
                             "set calibration= on the AdaptiveQuantizer only")

    @property
    def effective_calibration(self) -> CalibrationConfig | None:
        """The plan's calibration: its own, else the one its parts share."""
        if self.calibration is not None:
            return self.calibration
        return next((p.calibration for p in self.parts() if p.calibration is not None), None)

    def config_for(self, name: str) -> QuantizationConfig:
        """The config that applies to a tensor or module: its override, else by layer type."""
        if name in self.overrides:
            return self.overrides[name]
        kind = layer_type(name.removesuffix(".weight"))
        return {"attention": self.attention_config, "ffn": self.ffn_config}.get(kind, self.base_config)

    def compute_dtype_for(self, name: str) -> torch.dtype | str | None:
        own = self.config_for(name).compute_dtype
        return own if own is not None else self.compute_dtype

    def _skip(self, cfg: QuantizationConfig) -> list[str]:
        return cfg.skip_modules if self.skip_modules is None else self.skip_modules

    def choose(self, name: str, tensor: torch.Tensor) -> CodecChoice:
        cfg = self.config_for(name)
        module = name.rsplit(".", 1)[0]
        if not is_quantizable(name, tensor) or module_matches(module, self._skip(cfg)):
            return CodecChoice(CodecName.RAW)
        if is_vocab(module) and name not in self.overrides:
            return cfg.vocab_choice()
        if cfg.mode is QuantizationMode.NONE:
            return CodecChoice(CodecName.RAW)
        return cfg.codec_choice()

    def parts(self) -> list[QuantizationConfig]:
        return [self.base_config, self.attention_config, self.ffn_config, *self.overrides.values()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "adaptive",
            "base_config": self.base_config.to_dict(),
            "attention_config": self.attention_config.to_dict(),
            "ffn_config": self.ffn_config.to_dict(),
            "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
            "compute_dtype": dtype_str(self.compute_dtype),
            **({"overrides": {k: v.to_dict() for k, v in sorted(self.overrides.items())}} if self.overrides else {}),
            **({"calibration": self.calibration.to_dict()} if self.calibration is not None else {}),
            **({"planned": dict(self.planned)} if self.planned else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdaptiveQuantizer":
        d = {k: v for k, v in d.items() if k != "kind"}
        known = {"base_config", "attention_config", "ffn_config", "skip_modules", "compute_dtype", "overrides", "calibration", "planned"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdaptiveQuantizer keys {unknown}; known: {sorted(known)}")
        for k in ("base_config", "attention_config", "ffn_config"):
            if d.get(k) is not None:
                d[k] = QuantizationConfig.from_dict(d[k])
        if "overrides" in d:
            d["overrides"] = {k: QuantizationConfig.from_dict(v) for k, v in d["overrides"].items()}
        return cls(**d)

    def fingerprint(self) -> str:
        d = self.to_dict()
        for k in ("base_config", "attention_config", "ffn_config"):
            d[k] = getattr(self, k).canonical_dict()
        if self.overrides:
            d["overrides"] = {k: v.canonical_dict() for k, v in sorted(self.overrides.items())}
        if self.calibration is not None:
            d["calibration"] = self.calibration.fingerprint_dict()
        d.pop("planned", None)  # what the plan reached is a record, not a property of the cache
        return _fingerprint(d)

    def quantize_model(self, model, *, progress: bool = False):
        """Swap the model's linear layers in place, by name, for quantized modules (each with
        the config :meth:`config_for` picks; skipped and ``NONE`` ones stay); returns the model.
        A Hugging Face model runs and generates with its own code afterwards."""
        from sli.offline.modules import quantize_model_linears

        return quantize_model_linears(model, self, progress=progress)


