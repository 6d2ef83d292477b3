"""Architecture registry: where a decoder-only model keeps its embeddings, layers, norm and head.

Every model is run with transformers' own modules; this registry only says how its state
dict splits into the units sli streams: ``embed`` (token embeddings and anything else
before the first layer), ``layer.<i>`` (one decoder layer), and ``head`` (final norm and
output projection).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from cache.manifest import EMBED_GROUP, HEAD_GROUP, layer_group



class UnsupportedArchitectureError(ValueError):
    """The model type is not in the registry."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family (dotted, as in the transformers state dict)."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    norm: str = "model.norm"
    head: str = "lm_head"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def group_of(self, tensor_name: str) -> str:
        """The streaming unit a tensor belongs to: ``embed``, ``layer.<i>`` or ``head``."""
        m = re.match(re.escape(self.layers) + r"\.(\d+)\.", tensor_name)
        if m:
            return layer_group(int(m.group(1)))
        if tensor_name.startswith(self.norm + ".") or tensor_name.startswith(self.head + "."):
            return HEAD_GROUP
        return EMBED_GROUP

    def group_order(self, num_layers: int) -> list[str]:
        return [EMBED_GROUP, *(layer_group(i) for i in range(num_layers)), HEAD_GROUP]


_LLAMA_LIKE = ArchSpec()

_REGISTRY: dict[str, ArchSpec] = {
    t: _LLAMA_LIKE
    for t in (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "starcoder2",
        "stablelm",
        "smollm3",
    )
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add (or replace) the spec for ``model_type``."""
    _REGISTRY[model_type] = spec


def known_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_type: str) -> ArchSpec:
    """Return the spec of a model type.

    Raises:
        UnsupportedArchitectureError: naming the type and the known ones.
    """
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not in sli's architecture registry (known: {', '.join(known_architectures())}); "
            "add it with runtime.arch.register_architecture(model_type, ArchSpec(embed=..., layers=..., norm=..., head=...))"
        ) from None
