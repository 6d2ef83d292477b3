"""`UniversalSLIProcessor`: the facade users start from. It owns no logic of its own: it
resolves the model and the plan, and delegates to the writer (and, later, the runtime)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.store import LayerStore
from runtime.executor import StreamingModel
from runtime.generate import GenerationOutput, GenerationStats, SamplingConfig
from runtime.generate import stream as stream_tokens
from runtime.tokenizer import load_tokenizer
from sli.config import AdaptiveQuantizer, QuantizationConfig, default_registry
from sli.fetch import resolve_model, sli_home
from sli.sources import ModelSource, open_source
from sli.writer import QuantizationReport, quantize_model, variant_id

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What :meth:`UniversalSLIProcessor.generate` returns."""

    text: str
    token_ids: list[int]
    stats: GenerationStats


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
        memory_budget: for inference: ``"512MB"``, ``"2GiB"`` or bytes (default: hold everything).
        dtype: compute dtype for inference (``"float32"``, ``"bfloat16"``, ``"float16"``).

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
        memory_budget: str | int | None = None,
        dtype: str = "float32",
    ) -> None:
        if quantization_config is not None and adaptive_quantizer is not None:
            raise ValueError("give quantization_config or adaptive_quantizer, not both")
        if isinstance(quantization_config, str):
            quantization_config = default_registry().get(quantization_config)
        self.plan: QuantizationConfig | AdaptiveQuantizer = adaptive_quantizer or quantization_config or QuantizationConfig()
        self.model_path = resolve_model(model_name)
        # a cache directory given as the model: run what it holds, no source needed
        self.cache_only = (self.model_path / "data.mdb").is_file()
        if self.cache_only:
            cache_dir = self.model_path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else sli_home() / "cache"
        if not 0 <= compress_level <= 22:
            raise ValueError(f"compress_level must be 0..22 (0 = no zstd), got {compress_level}")
        self.compress_level = compress_level
        self.progress = progress
        self.memory_budget = memory_budget
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self._source: ModelSource | None = None
        self._store: LayerStore | None = None
        self._model: StreamingModel | None = None
        self._tokenizer = None

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = open_source(self.model_path)
        return self._source

    @property
    def variant_id(self) -> str:
        if self.cache_only:
            return self._cached_variant()
        return variant_id(self.source.fingerprint(), self.plan.fingerprint())

    def _cached_variant(self) -> str:
        with LayerStore(self.cache_dir, readonly=True) as st:
            manifests = [st.require_manifest(v) for v in st.list_variants()]
        fp = self.plan.fingerprint()
        match = [m for m in manifests if m.quant_fingerprint == fp]
        if len(match) == 1:
            return match[0].variant_id
        held = ", ".join(f"{m.variant_id} ({m.source.get('path')}, {m.quantization.get('mode', 'mixed')})" for m in manifests)
        if not match:
            raise ValueError(f"cache {self.cache_dir} holds no variant quantized this way; it holds: {held or 'nothing'}")
        raise ValueError(f"cache {self.cache_dir} holds this quantization for several models ({held}); pass the model path")

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

    # -- inference -------------------------------------------------------------------------
    @property
    def model(self) -> StreamingModel:
        """The streaming model; quantizes first when the cache lacks this variant."""
        if self._model is None:
            # quantize() builds or finishes the variant, and returns at once when it is complete
            vid = self.variant_id if self.cache_only else self.quantize().variant_id
            self._store = LayerStore(self.cache_dir, readonly=True)
            budget = self.memory_budget if self.memory_budget is not None else 1 << 50
            self._model = StreamingModel(self._store, vid, memory_budget=budget, dtype=self.dtype)
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            model = self.model  # opens the store
            self._tokenizer = load_tokenizer(model.store, model.manifest)
        return self._tokenizer

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float logits ``[batch, seq, vocab]`` of the streamed model."""
        return self.model.logits(input_ids)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        out: GenerationOutput | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` (tokenized as ``tokenizer(prompt)``, no chat
        template) piece by piece as text. Stops at the tokenizer's end-of-sequence token."""
        tok = self.tokenizer
        ids = torch.tensor([tok(prompt)["input_ids"]])
        eos = tok.eos_token_id
        cfg = SamplingConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_token_ids=tuple([eos] if isinstance(eos, int) else (eos or [])),
        )
        out = out if out is not None else GenerationOutput()
        emitted = ""
        for _ in stream_tokens(self.model, ids, cfg, out):
            text = tok.decode(out.token_ids, skip_special_tokens=True)
            if len(text) > len(emitted) and not text.endswith("\ufffd"):  # hold back a split multi-byte char
                yield text[len(emitted) :]
                emitted = text

    def generate(self, prompt: str, **kwargs) -> GenerationResult:
        """Blocking wrapper over :meth:`stream`; same options. Returns text, token ids and stats."""
        out = GenerationOutput()
        text = "".join(self.stream(prompt, out=out, **kwargs))
        return GenerationResult(text=text, token_ids=out.token_ids, stats=out.stats)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._source is not None:
            self._source.close()
            self._source = None
