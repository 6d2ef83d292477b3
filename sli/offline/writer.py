"""The write path: quantize a model group by group (embeddings, each decoder layer, head)
into a `LayerStore`, resuming from the last committed group after an interruption."""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from cache.codecs import CodecName
from cache.errors import MapResized
from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, Manifest, TensorEntry, chunk_record_name
from cache.record import encode_record
from cache.store import LayerStore
from runtime.arch import get_arch
from runtime.memory import PeakMemorySampler, release_free_memory
from sli.offline.adaptive import AdaptiveQuantizer
from sli.offline.config import QuantizationConfig
from sli.offline.quantizer import TensorQuantizer
from sli.offline.sources import ModelSource

logger = logging.getLogger(__name__)


class MemoryValidationError(ValueError):
    """A quantized tensor is not smaller than the original."""


def library_version() -> str:
    from sli.version import __version__

    return __version__


def variant_id(model_fingerprint: str, quant_fingerprint: str) -> str:
    """Key of a (model, quantization) pair inside a cache directory."""
    return hashlib.sha256(f"{model_fingerprint}:{quant_fingerprint}".encode()).hexdigest()[:16]


@dataclass
class QuantizationReport:
    """What a quantization produced and cost. Sizes in bytes."""

    variant_id: str
    cache_dir: str
    model: str
    quantization: dict[str, Any]
    num_parameters: int
    quantized_parameters: int
    original_bytes: int  # source tensors, numel * source element size
    raw_bytes: int  # encoded parts before zstd
    stored_bytes: int  # payload bytes on disk
    seconds: float  # time spent quantizing (summed over runs when resumed)
    peak_rss_bytes: int  # peak anonymous RSS over baseline, this run
    built_groups: int  # groups written by this run
    resumed_groups: int  # groups found already committed
    codec_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # codec -> {original, raw, stored, params}
    tensor_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    largest_group_bytes: int = 0  # largest group's source bytes (a floor for peak memory)

    @property
    def reduction_factor(self) -> float:
        """Original bytes over bytes on disk."""
        return self.original_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def bits_per_weight(self) -> float:
        """Bits on disk per parameter, all tensors included."""
        return 8.0 * self.stored_bytes / self.num_parameters if self.num_parameters else float("nan")

    @property
    def zstd_ratio(self) -> float:
        """Raw encoded bytes over stored bytes (1.0 where zstd was not kept)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def mean_rel_mse(self) -> float:
        """Mean relative MSE over the quantized tensors (0 when nothing was quantized)."""
        vals = [e["rel_mse"] for e in self.tensor_errors.values() if e["codec"] != CodecName.RAW.value]
        return sum(vals) / len(vals) if vals else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.original_bytes / 1e6 / self.seconds if self.seconds else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "variant_id": self.variant_id,
            "cache_dir": self.cache_dir,
            "model": self.model,
            "mode": self.quantization.get("mode", self.quantization.get("kind")),
            "parameters": self.num_parameters,
            "quantized_parameters": self.quantized_parameters,
            "original_MB": round(self.original_bytes / 1e6, 2),
            "cache_MB": round(self.stored_bytes / 1e6, 2),
            "reduction_factor": round(self.reduction_factor, 3),
            "bits_per_weight": round(self.bits_per_weight, 3),
            "zstd_ratio": round(self.zstd_ratio, 3),
            "mean_rel_mse": self.mean_rel_mse,
            "seconds": round(self.seconds, 2),
            "MB_per_s": round(self.mb_per_s, 1),
            "peak_rss_MB": round(self.peak_rss_bytes / 1e6, 1),
            "largest_group_MB": round(self.largest_group_bytes / 1e6, 1),
            "built_groups": self.built_groups,
            "resumed_groups": self.resumed_groups,
        }

    @classmethod
    def from_manifest(cls, m: Manifest, cache_dir: str, *, peak_rss_bytes: int, built: int, resumed: int) -> "QuantizationReport":
        codec_bytes: dict[str, dict[str, int]] = defaultdict(lambda: {"original": 0, "raw": 0, "stored": 0, "params": 0})
        errors: dict[str, dict[str, float]] = {}
        nparams = qparams = 0
        for t in m.tensors().values():
            n = math.prod(t.shape)
            nparams += n
            if t.codec != CodecName.RAW.value:
                qparams += n
            c = codec_bytes[t.codec]
            c["original"] += t.original_bytes
            c["raw"] += t.raw_bytes
            c["stored"] += t.stored_bytes
            c["params"] += n
            errors[t.name] = {"codec": t.codec, "rel_mse": t.rel_mse, "max_abs_err": t.max_abs_err}
        return cls(
            variant_id=m.variant_id,
            cache_dir=cache_dir,
            model=m.source.get("path", ""),
            quantization=m.quantization,
            num_parameters=nparams,
            quantized_parameters=qparams,
            original_bytes=m.original_bytes,
            raw_bytes=m.raw_bytes,
            stored_bytes=m.stored_bytes,
            seconds=m.seconds,
            peak_rss_bytes=peak_rss_bytes,
            built_groups=built,
            resumed_groups=resumed,
            codec_bytes=dict(codec_bytes),
            tensor_errors=errors,
            largest_group_bytes=max((g.original_bytes for g in m.groups), default=0),
        )


def _group_tensors(source: ModelSource) -> tuple[list[str], dict[str, list[str]]]:
    config = source.config
    arch = get_arch(config.model_type)
    order = arch.group_order(config.num_hidden_layers)
    groups: dict[str, list[str]] = {g: [] for g in order}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in source.tensor_names():
        if tied and name == f"{arch.head}.weight":
            continue  # tied to the embeddings: stored once, under the embedding's name
        g = arch.group_of(name)
        if g not in groups:
            raise ValueError(f"tensor {name} belongs to {g}, beyond the {config.num_hidden_layers} layers in the config")
        groups[g].append(name)
    return order, groups


# Vocabulary-sized tensors (embeddings, output head) are stored in row chunks of about this
# many bytes once decoded to float32, so the runtime can look embeddings up and apply the
# head chunk by chunk without ever holding the whole matrix.
CHUNK_DECODED_BYTES = 4 << 20


def _chunk_rows(group: str, tensor) -> int:
    """Rows per record for a tensor of ``group``; 0 keeps it in one record."""
    if group not in (EMBED_GROUP, HEAD_GROUP) or tensor.ndim != 2:
        return 0
    rows = max(64, CHUNK_DECODED_BYTES // (4 * tensor.shape[1]) // 64 * 64)
    return rows if tensor.shape[0] > rows else 0


def _quantize_group(
    read: Callable[[str], Any],
    quantize: Callable[[str, Any], tuple[Any, Any]],
    gname: str,
    names: list[str],
    compress_level: int,
    validate_memory: bool,
    put: Callable[[str, memoryview], None],
) -> GroupEntry:
    """Quantize one group tensor by tensor (``read(name)`` gives a tensor, ``quantize(name,
    piece)`` its encoding and :class:`TensorStats`), handing each record to ``put`` as it is
    made; returns the group's entry."""
    t0 = time.perf_counter()
    tensors: list[TensorEntry] = []
    for name in names:
        tensor = read(name)
        rows = _chunk_rows(gname, tensor)
        pieces = [(name, tensor)] if not rows else [
            (chunk_record_name(name, k), tensor[r : r + rows]) for k, r in enumerate(range(0, tensor.shape[0], rows))
        ]
        shape, dtype = list(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        original = raw_len = stored_len = 0
        sq_err = sq_ref = max_abs = 0.0
        compressed = False
        params: dict = {}
        for rname, piece in pieces:
            enc, stats = quantize(name, piece)
            if validate_memory and enc.codec != CodecName.RAW.value and stats.encoded_bytes >= stats.original_bytes:
                raise MemoryValidationError(
                    f"{name}: {enc.codec} takes {stats.encoded_bytes} bytes, not less than the original "
                    f"{stats.original_bytes}; choose another mode or skip the module"
                )
            codec, params = enc.codec, dict(enc.params)
            if len(pieces) == 1:
                sq_err, sq_ref = stats.rel_mse, 1.0
            else:  # rel_mse is relative to this piece's mean square: weight it back
                ms = float(piece.float().pow(2).mean())
                sq_err += stats.rel_mse * ms * piece.numel()
                sq_ref += ms * piece.numel()
            max_abs = max(max_abs, stats.max_abs_err)
            rec, info = encode_record(enc, compress_level=compress_level)
            del enc
            put(rname, rec)
            del rec
            original += stats.original_bytes
            raw_len += info.raw_len
            stored_len += info.stored_len
            compressed = compressed or info.compressed
        del tensor, pieces, piece
        tensors.append(
            TensorEntry(
                name=name,
                group=gname,
                codec=codec,
                shape=shape,
                dtype=dtype,
                original_bytes=original,
                raw_bytes=raw_len,
                stored_bytes=stored_len,
                compressed=compressed,
                rel_mse=sq_err / sq_ref if sq_ref else 0.0,
                max_abs_err=max_abs,
                chunk_rows=rows,
                params=params,
            )
        )
    return GroupEntry(name=gname, tensors=tensors, seconds=time.perf_counter() - t0)


class _Committer:
    """The thread that owns LMDB's write transactions. Records are put as they are made
    (LMDB copies each, so it is freed at once) and a group commits when its entry arrives;
    the committing (copies, fsync: no GIL held) overlaps the quantizing of the next group.
    The queue holds a few records at most, so memory stays near one group's dirty pages.
    An error stops the thread; :meth:`send` and :meth:`close` raise it in the caller."""

    def __init__(self, store: LayerStore, vid: str, depth: int = 4) -> None:
        self.store, self.vid = store, vid
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sli-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        group = None
        try:
            while (item := self.queue.get()) is not None:
                kind, *args = item
                if kind == "begin":
                    group = self.store.write_group(self.vid, args[0], expected_bytes=args[1])
                    writer = group.__enter__()
                elif kind == "put":
                    writer.put(*args)
                elif kind == "call":  # after every group sent before it has committed
                    args[0]()
                else:  # "finish": the entry, then commit
                    writer.finish(args[0])
                    group.__exit__(None, None, None)
                    group = None
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.error = e
            if group is not None:
                try:
                    group.__exit__(type(e), e, e.__traceback__)  # aborts; a full map grows: MapResized
                except BaseException as e2:  # noqa: BLE001
                    self.error = e2
            while self.queue.get() is not None:  # let the producer finish; nothing more is written
                pass

    def send(self, *item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def sync(self) -> None:
        """Wait until every group sent so far has committed."""
        done = threading.Event()
        self.send("call", done.set)
        while not done.wait(0.05):
            if self.error is not None or not self.thread.is_alive():
                break
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _build_groups(
    source: ModelSource,
    quantizer: TensorQuantizer,
    store: LayerStore,
    vid: str,
    todo: list[str],
    groups: dict[str, list[str]],
    compress_level: int,
    validate_memory: bool,
    *,
    progress: bool,
    done: int,
    total: int,
) -> None:
    """Quantize and commit the groups in ``todo``. Three stages overlap: the kernel reads the
    next group's source bytes (advice, on a thread, as the call can wait on the disk's
    queue), this thread quantizes, and a :class:`_Committer` thread writes the records."""
    bar = tqdm(total=total, initial=done, desc=f"quantize {source.path.name}", unit="group", disable=not progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-source-readahead") as reader:
        advice = reader.submit(source.read_ahead, groups[todo[0]]) if todo else None
        committer = _Committer(store, vid)
        try:
            for k, gname in enumerate(todo):
                advice.result()  # the advice went through (or its error surfaces here)
                if k + 1 < len(todo):
                    advice = reader.submit(source.read_ahead, groups[todo[k + 1]])
                # expected bytes: at most the source bytes, except when kept tensors are widened
                committer.send("begin", gname, 2 * sum(source.tensor_nbytes(n) for n in groups[gname]))
                put = lambda rname, rec: committer.send("put", rname, rec)  # noqa: E731
                entry = _quantize_group(source.read, quantizer.quantize_tensor, gname, groups[gname], compress_level, validate_memory, put)
                committer.send("finish", entry)
                release_free_memory()
                bar.update()
                bar.set_postfix(MBps=f"{entry.original_bytes / 1e6 / max(entry.seconds, 1e-9):.0f}")
        finally:
            committer.close()
            bar.close()


def _build_calibrated(builder, store: LayerStore, vid: str, order: list[str], todo: list[str], groups: dict[str, list[str]],
                      compress_level: int, validate_memory: bool) -> None:
    """The calibrated path (:mod:`sli.offline.calibrate`), committing through a :class:`_Committer`."""
    from sli.offline.calibrate import build_calibrated

    committer = _Committer(store, vid)

    def put_group(gname: str, read, quantize, extra: dict) -> GroupEntry:
        committer.send("begin", gname, 2 * sum(builder.source.tensor_nbytes(n) for n in groups[gname]))
        put = lambda rname, rec: committer.send("put", rname, rec)  # noqa: E731
        entry = _quantize_group(read, quantize, gname, groups[gname], compress_level, validate_memory, put)
        entry.extra.update(extra)
        committer.send("finish", entry)
        return entry

    try:
        build_calibrated(builder, order, todo, put_group=put_group, sync=committer.sync,
                         after_commit=lambda fn: committer.send("call", fn))
    finally:
        committer.close()


def quantize_model(
    source: ModelSource,
    plan: QuantizationConfig | AdaptiveQuantizer,
    store: LayerStore,
    *,
    compress_level: int = 3,
    validate_memory: bool = False,
    progress: bool = True,
    memory_budget: int | None = None,
) -> QuantizationReport:
    """Quantize ``source`` into ``store`` one group at a time; resume if partly done.

    Each group (embeddings, a decoder layer, the head) is read, quantized, encoded and
    committed in one transaction, then freed: peak memory stays near the largest group.
    The manifest is written last. A plan with a calibration (GPTQ, AWQ) is built layer by
    layer on calibration activations (:mod:`sli.offline.calibrate`); ``memory_budget``
    (bytes) then decides whether those activations stay in memory or spill to the cache
    directory.

    Raises:
        MemoryValidationError: ``validate_memory`` and a quantized tensor is not smaller than
            its original (nothing of that group is written).
        UnsupportedArchitectureError: the model type is not in the registry.
    """
    vid = variant_id(source.fingerprint(), plan.fingerprint())
    with store.variant_lock(vid):  # another writer of this variant finishes first; then it is found complete
        return _quantize_model(source, plan, store, vid, compress_level=compress_level, validate_memory=validate_memory,
                               progress=progress, memory_budget=memory_budget)


def _quantize_model(source, plan, store: LayerStore, vid: str, *, compress_level: int, validate_memory: bool, progress: bool,
                    memory_budget: int | None) -> QuantizationReport:
    arch = get_arch(source.config.model_type)
    model_fp, quant_fp = source.fingerprint(), plan.fingerprint()
    existing = store.get_manifest(vid)
    if existing is not None:
        logger.info("variant %s is already complete in %s", vid, store.path)
        return QuantizationReport.from_manifest(existing, str(store.path), peak_rss_bytes=0, built=0, resumed=len(existing.groups))

    order, groups = _group_tensors(source)
    store.begin_variant(vid, {"model_fingerprint": model_fp, "quant_fingerprint": quant_fp, "source": source.describe()})
    quantizer = TensorQuantizer(plan)
    todo = [g for g in order if store.get_group(vid, g) is None]
    t_start = time.perf_counter()
    calib = plan.effective_calibration
    extra: dict[str, Any] = {}
    # 10 ms samples: the peak lives as long as a group's buffers (seconds); 2 ms sampling
    # took 10% of a core from the quantizer on 2 cores (measured on an 8 B model)
    with PeakMemorySampler(interval=0.01) as mem:
        builder = None
        if calib is not None:
            from sli.offline.calibrate import CalibratedBuilder

            builder = CalibratedBuilder(source, plan, calib, store, vid, groups, compress_level=compress_level,
                                        validate_memory=validate_memory, memory_budget=memory_budget, progress=progress)
        while True:
            missing = [g for g in todo if store.get_group(vid, g) is None]
            try:
                if builder is not None:
                    _build_calibrated(builder, store, vid, order, missing, groups, compress_level, validate_memory)
                else:
                    _build_groups(source, quantizer, store, vid, missing, groups, compress_level, validate_memory,
                                  progress=progress, done=len(order) - len(missing), total=len(order))
                break
            except MapResized:
                logger.debug("LMDB map grown while writing; building the groups not yet committed")
        wall = time.perf_counter() - t_start  # reading, quantizing and committing, overlapped
        if builder is not None:
            builder.close()
            extra["calibration"] = {**builder.summary, "method": calib.method.value, "text": calib.text_name,
                                    "text_sha256": calib.text_sha256, "samples": calib.samples, "seqlen": calib.seqlen,
                                    "peak_rss_bytes": mem.peak_bytes, "seconds": wall}
        files = source.tokenizer_files()
        store.put_files(model_fp, files)
    entries = [store.get_group(vid, g) for g in order]
    built, resumed = len(todo), len(order) - len(todo)
    built_now = set(todo)
    manifest = Manifest(
        variant_id=vid,
        model_fingerprint=model_fp,
        quant_fingerprint=quant_fp,
        library_version=library_version(),
        model_type=source.config.model_type,
        source=source.describe(),
        config=source.config_dict(),
        quantization=plan.to_dict(),
        tokenizer_files=sorted(files),
        groups=entries,
        arch=arch.to_dict(),
        compress_level=compress_level,
        # this run's wall time, plus the time resumed groups took when they were built
        seconds=wall + sum(e.seconds for e in entries if e.name not in built_now),
        peak_rss_bytes=mem.peak_bytes,
        extra=extra,
    )
    store.put_manifest(manifest)
    logger.info("variant %s complete: %d groups built, %d resumed", vid, built, resumed)
    return QuantizationReport.from_manifest(manifest, str(store.path), peak_rss_bytes=mem.peak_bytes, built=built, resumed=resumed)
