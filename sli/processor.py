"""`UniversalSLIProcessor`: the facade users start from. It owns no logic of its own: it
resolves the model and the plan, and delegates to the writer (and, later, the runtime)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cache.store import LayerStore
from sli.config import AdaptiveQuantizer, QuantizationConfig, default_registry
from sli.fetch import resolve_model, sli_home
from sli.sources import ModelSource, open_source
from sli.writer import QuantizationReport, quantize_model, variant_id

logger = logging.getLogger(__name__)


class UniversalSLIProcessor:
    """Quantize a Hugging Face causal LM layer by layer into an on-disk cache.

    Args:
        model_name: a model folder (safetensors or .bin), a .gguf file, or the name of the
            fetched test model (``SmolLM2-135M-Instruct``).
        quantization_config: a :class:`QuantizationConfig`, or a preset name from the
            registry (``"nf4"``, ``"int8"``, ``"mixed"`` ...). Default NF4.
        adaptive_quantizer: per-module mixed precision; excludes ``quantization_config``.
        cache_dir: cache directory (default ``$SLI_HOME/cache``).
        compress_level: zstd level for records (0 disables compression).
        progress: show a progress bar.

    Raises:
        ModelSourceError: the model is missing or malformed.
        ValueError: both a config and an adaptive quantizer were given.
    """

    def __init__(
        self,
        model_name: str | os.PathLike[str],
        *,
        quantization_config: QuantizationConfig | AdaptiveQuantizer | str | None = None,
        adaptive_quantizer: AdaptiveQuantizer | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        compress_level: int = 3,
        progress: bool = True,
    ) -> None:
        if quantization_config is not None and adaptive_quantizer is not None:
            raise ValueError("give quantization_config or adaptive_quantizer, not both")
        if isinstance(quantization_config, str):
            quantization_config = default_registry().get(quantization_config)
        self.plan: QuantizationConfig | AdaptiveQuantizer = adaptive_quantizer or quantization_config or QuantizationConfig()
        self.model_path = resolve_model(model_name)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else sli_home() / "cache"
        if not 0 <= compress_level <= 22:
            raise ValueError(f"compress_level must be 0..22 (0 = no zstd), got {compress_level}")
        self.compress_level = compress_level
        self.progress = progress
        self._source: ModelSource | None = None

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = open_source(self.model_path)
        return self._source

    @property
    def variant_id(self) -> str:
        return variant_id(self.source.fingerprint(), self.plan.fingerprint())

    def quantize(self, *, validate_memory: bool = False) -> QuantizationReport:
        """Build the cache variant for this model and plan, or finish an interrupted build.

        Returns:
            A :class:`QuantizationReport` (sizes, reduction factor, time, peak memory, errors).
        """
        with LayerStore(self.cache_dir) as store:
            return quantize_model(
                self.source,
                self.plan,
                store,
                compress_level=self.compress_level,
                validate_memory=validate_memory,
                progress=self.progress,
            )

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
