"""The CUDA path: a streaming model whose layers compute on a GPU inside two budgets.

Written and unit-tested in its device-independent parts (:mod:`runtime.devplan`,
:mod:`runtime.copysched`) on a host without a GPU; the CUDA-specific code here has **not
been run on a GPU yet**. It refuses to compute until it has proved itself in this process:
the first streamed layer is decoded on the GPU and compared with the CPU decode of the same
records (:meth:`CudaStreamingModel.prove`).

How bytes move, per streamed layer:

1. the layer's records are read from the cache (or from pinned host memory when the plan
   keeps them there) into a pinned staging buffer, at their stored, quantized size;
2. a non-blocking copy on a side stream moves them into the GPU slot's record buffer;
3. on the compute stream, after waiting for that copy's event, the codecs decode them into
   the slot's compute-form buffers (dequantize-then-matmul; nf4/fp4 by the codec's table
   lookup in torch, on the GPU), and the layer runs.

The copy of the next layer overlaps this layer's compute (:class:`~runtime.copysched.LayerPipeline`).
Embeddings, head and small tensors are resident on the GPU (decoded there from their records).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from cache.codecs import decode_tensor
from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, TensorEntry, layer_group
from cache.record import EncodedTensor, dtype_from_name
from cache.store import LayerStore
from runtime.arch import ArchSpec
from runtime.budget import activation_bytes, kv_bytes_per_token
from runtime.copysched import LayerPipeline
from runtime.devplan import DevicePlan, DeviceUnit, plan_two_budgets
from runtime.loader import Slot, StreamStats, role_sizes
from runtime.memory import parse_size
from runtime.surgery import assign, empty_weights

logger = logging.getLogger(__name__)

ALIGN = 256  # part offsets inside record buffers (any dtype view stays aligned)
PROVE_TOLERANCE = 1e-3  # relative error of the GPU decode against the CPU decode (same records)


class CudaUnavailableError(RuntimeError):
    """``device="cuda"`` on a host where torch sees no CUDA device."""


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"device='cuda' but torch {torch.__version__} sees no CUDA device (a CPU build of torch, or no GPU); "
            "install a CUDA build of torch on a GPU host, or use device='cpu'"
        )
    return torch.device("cuda", torch.cuda.current_device())


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class RecordLayout:
    """Where each part of a layer's records sits in a flat byte buffer (the same layout in
    the pinned staging buffer and in the GPU slot)."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, str, int, tuple[int, ...], torch.dtype]] = []  # tensor, part, offset, shape, dtype
        self.headers: dict[str, tuple[str, tuple[int, ...], str, dict]] = {}  # tensor -> codec, shape, dtype, params
        self.nbytes = 0

    @classmethod
    def of(cls, headers: dict[str, dict]) -> "RecordLayout":
        """From the records' headers (:meth:`cache.store.RecordReader.header`): no payload is read."""
        lay = cls()
        for name, h in headers.items():
            lay.headers[name] = (h["codec"], tuple(h["shape"]), h["dtype"], dict(h["params"]))
            for p in h["parts"]:
                lay.parts.append((name, p["name"], lay.nbytes, tuple(p["shape"]), dtype_from_name(p["dtype"])))
                lay.nbytes = _align(lay.nbytes + p["nbytes"])
        return lay

    def fill(self, buf: torch.Tensor, encoded: dict[str, EncodedTensor]) -> None:
        for name, part, off, shape, dtype in self.parts:
            src = encoded[name].parts[part]
            n = src.numel() * src.element_size()
            buf[off : off + n].copy_(src.contiguous().view(torch.uint8).reshape(-1))

    def views(self, buf: torch.Tensor) -> dict[str, EncodedTensor]:
        """The records as :class:`EncodedTensor` views into ``buf`` (host or GPU)."""
        parts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.headers}
        for name, part, off, shape, dtype in self.parts:
            n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            parts[name][part] = buf[off : off + n].view(dtype).view(shape)
        return {n: EncodedTensor(c, s, d, parts[n], p) for n, (c, s, d, p) in self.headers.items()}


class CudaCopyEngine:
    """Records into pinned staging, then onto the GPU on a side stream (see :class:`~runtime.copysched.CopyEngine`)."""

    def __init__(self, model: "CudaStreamingModel") -> None:
        self.m = model
        self.side = torch.cuda.Stream(model.device)
        self._staging_done: dict[int, torch.cuda.Event] = {}

    def copy(self, layer: int, slot: int, after):
        m = self.m
        t0 = time.perf_counter()
        done = self._staging_done.get(slot)
        # the previous copy out of this staging buffer must have finished before it is refilled
        host = m.stage(layer, slot, before_fill=done.synchronize if done is not None else None)
        n = m.layouts[layer].nbytes
        with torch.cuda.stream(self.side):
            if after is not None:
                self.side.wait_event(after)
            m.slot_records[slot][:n].copy_(host[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.side)
        if layer not in m.pinned:
            self._staging_done[slot] = ev
        m.stats.load_seconds += time.perf_counter() - t0
        return ev

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.m.device).wait_event(event)

    def record_compute(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.m.device))
        return ev


class SyncCopyEngine:
    """The same schedule with copies done at once and no events: what the device path does on
    a host without a GPU (``device="cpu"``), so that everything but the streams and events is
    tested everywhere."""

    def __init__(self, model: "CudaStreamingModel") -> None:
        self.m = model

    def copy(self, layer: int, slot: int, after):
        m = self.m
        t0 = time.perf_counter()
        host = m.stage(layer, slot)
        n = m.layouts[layer].nbytes
        m.slot_records[slot][:n].copy_(host[:n])
        m.stats.load_seconds += time.perf_counter() - t0
        return None

    def wait(self, event) -> None:
        pass

    def record_compute(self):
        return None


class CudaStreamingModel:
    """A causal LM computing on a GPU, its layers streamed within a GPU budget and a host budget.

    Args:
        store, variant_id: a complete variant.
        gpu_budget: GPU memory for weights, slots, KV and activations (``"4GB"``).
        memory_budget: host memory for pinned records and staging.
        dtype: compute dtype (bfloat16, float16 or float32).
        context_tokens: tokens of KV reserved on the GPU (default: the model's, at most 4096).
        device: ``"cuda"`` (default), or ``"cpu"``: the same path with synchronous copies and no
            pinned memory, which tests everything but the streams and events on any host.

    Raises:
        CudaUnavailableError: no CUDA device.
        BudgetTooSmallError: either budget below its minimum (the message names it).
    """

    def __init__(
        self,
        store: LayerStore,
        variant_id: str,
        *,
        gpu_budget: str | int,
        memory_budget: str | int,
        dtype: torch.dtype = torch.bfloat16,
        context_tokens: int | None = None,
        prefill_chunk: int = 512,
        device: str | torch.device = "cuda",
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from runtime.executor import config_from_manifest

        self.device = require_cuda() if torch.device(device).type == "cuda" else torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.store, self.variant_id, self.dtype = store, variant_id, dtype
        self.manifest = store.require_manifest(variant_id)
        self.config = config_from_manifest(self.manifest)
        self.arch = ArchSpec(**self.manifest.arch)
        self.groups: dict[str, GroupEntry] = {g.name: g for g in self.manifest.groups}
        self.prefill_chunk = prefill_chunk
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        for name, buf in list(self.model.named_buffers()):  # rotary tables and the like
            mod, _, b = name.rpartition(".")
            self.model.get_submodule(mod)._buffers[b] = buf.to(self.device)
        self.layers: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self.stats = StreamStats()
        esize = torch.empty(0, dtype=dtype).element_size()
        ctx = min(int(context_tokens or getattr(self.config, "max_position_embeddings", 4096) or 4096), 4096)
        self.context_tokens = ctx
        outside = [t for g in (EMBED_GROUP, HEAD_GROUP) for t in self.groups[g].tensors]
        gpu_fixed = {
            "kv cache": kv_bytes_per_token(self.config, esize) * ctx,
            "activations": activation_bytes(self.config, chunk_tokens=min(prefill_chunk, ctx), context_tokens=ctx, element_size=esize),
            "embeddings, head, small tensors": sum(math.prod(t.shape) for t in outside) * esize,
        }
        with store.reader() as r:
            self.layouts = {
                i: RecordLayout.of({t.name: r.header(variant_id, t.name) for t in self.groups[layer_group(i)].tensors})
                for i in range(len(self.layers))
            }
        units = [
            DeviceUnit(layer_group(i), sum(math.prod(t.shape) for t in self.groups[layer_group(i)].tensors) * esize,
                       self.layouts[i].nbytes, self.groups[layer_group(i)].stored_bytes)
            for i in range(len(self.layers))
        ]
        self.plan: DevicePlan = plan_two_budgets(
            units, gpu_budget=parse_size(gpu_budget), host_budget=parse_size(memory_budget), gpu_fixed=gpu_fixed, host_fixed={}
        )
        logger.info("%s", self.plan.describe())
        self._hooks: list = []
        self._load_resident()
        streamed = [i for i in range(len(self.layers)) if layer_group(i) not in self.plan.gpu_resident]
        self.pinned: dict[int, torch.Tensor] = {}
        for i in streamed:
            if layer_group(i) in self.plan.host_resident:
                buf = torch.empty(self.layouts[i].nbytes, dtype=torch.uint8, pin_memory=self.on_gpu)
                with store.reader() as r:
                    self.layouts[i].fill(buf, {t.name: r.get(variant_id, t.name) for t in self.groups[layer_group(i)].tensors})
                self.pinned[i] = buf
        n = self.plan.num_slots if streamed else 0
        self.staging = [torch.empty(self.plan.staging_bytes, dtype=torch.uint8, pin_memory=self.on_gpu) for _ in range(n)]
        self.slot_records = [torch.empty(self.plan.staging_bytes, dtype=torch.uint8, device=self.device) for _ in range(n)]
        self.slot_weights = [Slot(role_sizes(self.groups, self.arch.layers, streamed), dtype, self.device) for _ in range(n)]
        engine = CudaCopyEngine(self) if self.on_gpu else SyncCopyEngine(self)
        self.pipeline = LayerPipeline(engine, streamed, n) if streamed else None
        self._slot_of: dict[int, int] = {}
        for i in streamed:
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._make_loader(i)))
            self._hooks.append(self.layers[i].register_forward_hook(self._make_releaser(i)))
        self._proved = False

    # -- weights -----------------------------------------------------------------------------
    def stage(self, layer: int, slot: int, before_fill=None) -> torch.Tensor:
        """The host buffer holding ``layer``'s records: its pinned copy when the plan keeps one,
        else staging buffer ``slot``, filled from the cache (after ``before_fill()``)."""
        host = self.pinned.get(layer)
        if host is not None:
            return host
        if before_fill is not None:
            before_fill()
        host = self.staging[slot]
        with self.store.reader() as r:
            self.layouts[layer].fill(host, {t.name: r.get(self.variant_id, t.name) for t in self.groups[layer_group(layer)].tensors})
        self.stats.bytes_read += self.groups[layer_group(layer)].stored_bytes
        return host

    def _load_resident(self) -> None:
        def read(t: TensorEntry) -> torch.Tensor:  # copied at stored size, decoded on the device
            return self.store.read_tensor(self.variant_id, t, self.dtype, device=self.device)

        for g in (EMBED_GROUP, HEAD_GROUP):
            for t in self.groups[g].tensors:
                assign(self.model, {t.name: read(t)})
        head = f"{self.arch.head}.weight"
        if head not in self.manifest.tensors():
            assign(self.model, {head: self.model.get_submodule(self.arch.embed).weight})
        for i in range(len(self.layers)):
            if layer_group(i) in self.plan.gpu_resident:
                assign(self.model, {t.name: read(t) for t in self.groups[layer_group(i)].tensors})

    def _decode_slot(self, i: int, slot: int) -> dict[str, torch.Tensor]:
        """Layer i's records, in GPU slot ``slot``, decoded on the compute stream."""
        prefix = f"{self.arch.layers}.{i}."
        out = {}
        for name, enc in self.layouts[i].views(self.slot_records[slot]).items():
            role = name.removeprefix(prefix)
            dst = self.slot_weights[slot].view(role, list(enc.shape))
            out[name] = decode_tensor(enc, out=dst)
        return out

    def _make_loader(self, i: int):
        def hook(module, args):
            t0 = time.perf_counter()
            slot = self.pipeline.before(i)
            self._slot_of[i] = slot
            assign(self.model, self._decode_slot(i, slot))
            self.stats.layers_loaded += 1
            self.stats.wait_seconds += time.perf_counter() - t0

        return hook

    def _make_releaser(self, i: int):
        def hook(module, args, output):
            self.pipeline.after(i, self._slot_of.pop(i))
            empty_weights(self.layers[i])

        return hook

    # -- proof -------------------------------------------------------------------------------
    def prove(self) -> float:
        """Decode the first streamed layer on the GPU through the staging path and compare every
        tensor with the CPU decode of the same records; raise on a mismatch.

        Raises:
            RuntimeError: the GPU path gives other weights than the CPU decode.
        """
        if self.pipeline is None or self._proved:
            return 0.0
        i = self.pipeline.order[0]
        slot = self.pipeline.before(i)
        self._sync()
        got = self._decode_slot(i, slot)
        self._sync()
        worst = 0.0
        with self.store.reader() as r:
            for t in self.groups[layer_group(i)].tensors:
                ref = decode_tensor(r.get(self.variant_id, t.name), torch.float32)
                err = float((got[t.name].float().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))
                worst = max(worst, err)
                if not math.isfinite(err) or err > PROVE_TOLERANCE + (0.01 if self.dtype != torch.float32 else 0.0):
                    raise RuntimeError(
                        f"the CUDA path decodes {t.name} with relative error {err:.3g} against the CPU decode of the same "
                        f"records; nothing was computed with it. Use device='cpu' and report this (torch {torch.__version__})"
                    )
        self.pipeline.after(i, slot)
        self._sync()
        self.pipeline.reset()
        self._proved = True
        logger.info("device path proved on %s (%s; worst relative error %.2e)", t.name, self.device, worst)
        return worst

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    # -- running -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = StreamStats()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **kwargs):
        self.prove()
        kwargs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        try:
            return self.model(input_ids=input_ids.to(self.device), **kwargs)
        except BaseException:
            self._sync()
            if self.pipeline is not None:
                self.pipeline.reset()
            raise

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        return self.forward(input_ids, attention_mask=attention_mask, use_cache=False).logits.float().cpu()

    def peak_gpu_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.on_gpu else 0

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._sync()
