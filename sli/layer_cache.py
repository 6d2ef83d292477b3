"""`LayerCache`: quantized layers kept on disk by model and layer index, in sli's own cache.

It is the streaming cache, not a second store: every tensor is a checksummed LMDB record
in the format the runtime reads (zstd where it pays), a layer is one group written in one
transaction, and there is no pickle. What a layer *is* (its module tree) is kept as JSON
beside the group's entry, and rebuilt from it:

- ``nn.Linear``, :class:`~sli.quantization.QuantizedLinear`, ``nn.Embedding``,
  ``nn.LayerNorm``, ``nn.Sequential`` / ``nn.ModuleList`` of these, and argument-free
  activations (``ReLU``, ``GELU``, ``SiLU``, ``Tanh``, ``Identity``, ``Dropout``);
- any transformers module built from its model config (a decoder layer, an attention or MLP
  block): its class, the config as a dict and its layer index are kept, and the module is
  rebuilt by transformers itself, its quantized linears put back by name. A cache is data,
  not code: the class named must be an ``nn.Module`` defined in one of transformers'
  modeling modules (``transformers.models.<family>.modeling_<family>``), checked before
  anything is imported; a description naming anything else is refused
  (:func:`transformers_class`).

Anything else is refused when it is cached, never half stored.

Sizes: the records' stored bytes are kept under ``max_cache_size_gb`` (least recently used
layers leave first, logged; a layer is used when cached or read); LMDB reuses the pages
freed, so the file stays near that size. An in-memory LRU of rebuilt layers holds up to
``max_memory_cache_size_gb`` (``get_layer`` then returns the same module object). Several
processes may read and write one cache at once (LMDB's locking); the read times of one
process reach the disk when it next caches a layer, or on :meth:`LayerCache.close`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.codecs import CodecName, RawCodec
from cache.manifest import GroupEntry, TensorEntry, layer_group
from cache.record import EncodedTensor, dtype_from_name, dtype_name, encode_record
from cache.store import LayerStore
from sli.offline.config import COMPUTE_DTYPES, QuantizationMode, dtype_str, parse_dtype
from sli.offline.modules import QuantizedLinear

logger = logging.getLogger(__name__)

__all__ = ["LayerCache", "UnsupportedLayerError"]

GB = 1 << 30
VARIANT_PREFIX = "layer-cache-"
_RAW = RawCodec()
_ACTIVATIONS = {"ReLU", "GELU", "SiLU", "Tanh", "Identity", "Dropout", "Sigmoid"}
# which codecs a quantization mode writes (a layer cached "as nf4" must hold nf4 linears)
_MODE_CODECS = {
    QuantizationMode.NONE: set(),
    QuantizationMode.INT8: {CodecName.INT8_OUTLIER.value},
    QuantizationMode.INT8_DYNAMIC: {CodecName.INT8_CHANNEL.value},
    QuantizationMode.NF4: {CodecName.NF4.value},
    QuantizationMode.FP4: {CodecName.FP4.value},
    QuantizationMode.INT4: {CodecName.INT4_GROUP.value},
    QuantizationMode.INT3: {CodecName.INT3_GROUP.value},
    QuantizationMode.INT2: {CodecName.INT2_GROUP.value},
}


class UnsupportedLayerError(TypeError):
    """A module LayerCache cannot describe without pickle."""


def _default_dir() -> Path:
    from sli.offline.fetch import sli_home

    return sli_home() / "layer-cache"


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def _hf_config(module: nn.Module):
    """The transformers config a module was built from (its own or a submodule's)."""
    from transformers import PretrainedConfig

    for m in module.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig):
            return cfg
    return None


def _layer_idx(module: nn.Module) -> int | None:
    for m in module.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def describe(module: nn.Module) -> dict[str, Any]:
    """The JSON description a module is rebuilt from.

    Raises:
        UnsupportedLayerError: a module of a kind LayerCache cannot rebuild.
    """
    if isinstance(module, QuantizedLinear):
        return {"kind": "quantized_linear", "compute_dtype": dtype_str(module.compute_dtype), "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                "dtype": dtype_name(module.weight.dtype)}
    if isinstance(module, nn.Embedding):
        return {"kind": "embedding", "num": module.num_embeddings, "dim": module.embedding_dim, "padding_idx": module.padding_idx,
                "dtype": dtype_name(module.weight.dtype)}
    if isinstance(module, nn.LayerNorm):
        return {"kind": "layer_norm", "shape": list(module.normalized_shape), "eps": module.eps,
                "affine": module.elementwise_affine, "bias": module.bias is not None,
                "dtype": dtype_name(module.weight.dtype) if module.weight is not None else "float32"}
    if type(module) in (nn.Sequential, nn.ModuleList):
        return {"kind": type(module).__name__, "children": [[n, describe(c)] for n, c in module.named_children()]}
    if type(module).__module__.startswith("torch.nn") and type(module).__name__ in _ACTIVATIONS:
        args = {"p": module.p} if isinstance(module, nn.Dropout) else {"approximate": module.approximate} if isinstance(module, nn.GELU) else {}
        return {"kind": "activation", "class": type(module).__name__, "args": args}
    cls = type(module)
    cfg = _hf_config(module)
    if _MODELING_MODULE.fullmatch(cls.__module__) and _CLASS_NAME.fullmatch(cls.__qualname__) and cfg is not None:
        quantized = {n: describe(m) for n, m in _quantized(module).items()}
        return {"kind": "transformers", "class": f"{cls.__module__}.{cls.__qualname__}", "model_type": cfg.model_type,
                "config": cfg.to_dict(), "attn_implementation": getattr(cfg, "_attn_implementation", None),
                "layer_idx": _layer_idx(module), "quantized": quantized}
    raise UnsupportedLayerError(
        f"LayerCache cannot store a {cls.__module__}.{cls.__qualname__} without pickle: it stores nn.Linear, "
        "QuantizedLinear, nn.Embedding, nn.LayerNorm, nn.Sequential/ModuleList of these, and modules of transformers' "
        "modeling files built from a model config (decoder layers, attention and MLP blocks)"
    )


def _quantized(module: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}


def _in_encoding(name: str, quantized) -> bool:
    """Whether a state-dict key or record name belongs to a quantized linear's encoding (kept
    as one record, ``<linear>.weight``) rather than being a plain tensor (its bias included)."""
    owner, _, leaf = name.rpartition(".")
    return owner in quantized and leaf != "bias"


def _skeleton(desc: dict[str, Any], encoded: dict[str, EncodedTensor], prefix: str = "") -> nn.Module:
    """A module from its description; quantized linears are built from their encodings, other
    parameters are left empty (meta) for the caller to load."""
    kind = desc["kind"]
    if kind == "quantized_linear":
        enc = encoded[f"{prefix}weight"]
        bias = torch.empty(enc.shape[0], device="meta") if desc["bias"] else None
        q = QuantizedLinear(enc, None, compute_dtype=parse_dtype(desc["compute_dtype"], COMPUTE_DTYPES, "compute_dtype"))
        if bias is not None:
            q.bias = nn.Parameter(bias, requires_grad=False)
        return q
    if kind == "linear":
        return nn.Linear(desc["in"], desc["out"], bias=desc["bias"], device="meta", dtype=dtype_from_name(desc["dtype"]))
    if kind == "embedding":
        return nn.Embedding(desc["num"], desc["dim"], padding_idx=desc["padding_idx"], device="meta", dtype=dtype_from_name(desc["dtype"]))
    if kind == "layer_norm":
        return nn.LayerNorm(desc["shape"], eps=desc["eps"], elementwise_affine=desc["affine"], bias=desc["bias"], device="meta",
                            dtype=dtype_from_name(desc["dtype"]))
    if kind in ("Sequential", "ModuleList"):
        children = [(n, _skeleton(d, encoded, f"{prefix}{n}.")) for n, d in desc["children"]]
        if kind == "Sequential":
            return nn.Sequential(OrderedDict(children))
        return nn.ModuleList([c for _, c in children])
    if kind == "activation":
        if desc["class"] not in _ACTIVATIONS:
            raise UnsupportedLayerError(f"unknown activation {desc['class']!r} in a cached layer description")
        return getattr(nn, desc["class"])(**desc["args"])
    if kind == "transformers":
        return _transformers_skeleton(desc, encoded, prefix)
    raise UnsupportedLayerError(f"unknown module kind {kind!r} in a cached layer description (written by a newer sli?)")


# A cached description names the class to rebuild; a cache handed over is data, not code, so
# only a model building block transformers defines may be named: a class defined in one of
# its ``transformers.models.<family>.modeling_<family>`` modules, a subclass of nn.Module.
_MODELING_MODULE = re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def transformers_class(name: str) -> type[nn.Module]:
    """The transformers module class a cached layer names, after checking it may be built.

    Raises:
        UnsupportedLayerError: the name is not a module class defined in one of transformers'
            modeling modules (checked before anything is imported).
    """
    module_name, _, qualname = str(name).rpartition(".")
    refuse = (f"cached layer names {name!r}; LayerCache rebuilds only nn.Module classes defined in transformers' "
              "modeling modules (transformers.models.<family>.modeling_<family>.<Class>), so it refuses it: "
              "a cache is data, not code. Cache the layer again with this sli if it is yours")
    if not _MODELING_MODULE.fullmatch(module_name) or not _CLASS_NAME.fullmatch(qualname):
        raise UnsupportedLayerError(refuse)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnsupportedLayerError(f"{refuse} ({e})") from e
    cls = getattr(module, qualname, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == module_name):
        raise UnsupportedLayerError(refuse)
    return cls


def _transformers_skeleton(desc: dict[str, Any], encoded: dict[str, EncodedTensor], prefix: str) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cls = transformers_class(desc["class"])
    cfg_dict = {k: v for k, v in desc["config"].items() if k != "model_type"}
    config = AutoConfig.for_model(desc["model_type"], **cfg_dict)
    if desc.get("attn_implementation"):
        config._attn_implementation = desc["attn_implementation"]
    takes = inspect.signature(cls.__init__).parameters
    args = {"layer_idx": desc["layer_idx"]} if "layer_idx" in takes and desc["layer_idx"] is not None else {}
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        module = cls(config, **args)
    for name, qdesc in desc["quantized"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, _skeleton(qdesc, encoded, f"{prefix}{name}."))
    return module


class LayerCache:
    """Quantized layers on disk, by model id and layer index.

    Args:
        cache_dir: the cache directory (default ``$SLI_HOME/layer-cache``); may be the same
            directory as a processor's cache.
        max_cache_size_gb: stored bytes kept on disk; least recently used layers leave first.
        max_memory_cache_size_gb: rebuilt layers kept in memory (0: none).
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str] | None = None, max_cache_size_gb: float = 50.0, max_memory_cache_size_gb: float = 1.0
    ) -> None:
        if max_cache_size_gb <= 0 or max_memory_cache_size_gb < 0:
            raise ValueError(f"cache sizes must be positive, got max_cache_size_gb={max_cache_size_gb}, "
                             f"max_memory_cache_size_gb={max_memory_cache_size_gb}")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_dir()
        self.max_cache_bytes = int(max_cache_size_gb * GB)
        self.max_memory_bytes = int(max_memory_cache_size_gb * GB)
        try:
            self.store = LayerStore(self.cache_dir)
        except OSError as e:
            raise OSError(f"LayerCache cannot open {self.cache_dir} for writing ({e}); pass a writable cache_dir") from e
        self._memory: OrderedDict[tuple[str, int], tuple[nn.Module, int]] = OrderedDict()
        self._memory_bytes = 0
        self._used: dict[tuple[str, str], float] = {}  # read times not yet written

    # -- keys --------------------------------------------------------------------------------
    @staticmethod
    def _vid(model_id: str) -> str:
        return VARIANT_PREFIX + hashlib.sha256(model_id.encode()).hexdigest()[:16]

    # -- writing -----------------------------------------------------------------------------
    def cache_layer(self, model_id: str, layer_index: int, layer: nn.Module, quantization_mode: str | QuantizationMode | None = None) -> None:
        """Store ``layer`` as layer ``layer_index`` of ``model_id`` (replacing what was there).

        Raises:
            UnsupportedLayerError: a module kind that cannot be described without pickle.
            ValueError: ``quantization_mode`` does not match the layer's quantized linears, or
                the layer alone is larger than ``max_cache_size_gb``.
        """
        desc = describe(layer)
        quantized = _quantized(layer)
        modes = {m.codec for m in quantized.values()}
        if quantization_mode is not None and str(getattr(quantization_mode, "value", quantization_mode)) != "mixed":
            mode = QuantizationMode(getattr(quantization_mode, "value", quantization_mode))
            if modes - _MODE_CODECS[mode] or (mode is not QuantizationMode.NONE and not modes):
                raise ValueError(
                    f"layer {layer_index} of {model_id} holds codecs {sorted(modes) or ['none']}, not {mode.value}; "
                    "pass the mode it was quantized with (or 'mixed')"
                )
        vid, group = self._vid(model_id), layer_group(layer_index)
        records, entries = {}, []
        for qname, m in sorted(quantized.items()):
            self._add(records, entries, group, layer_index, f"{qname}.weight" if qname else "weight", m.encoded)
        for name, t in layer.state_dict().items():
            if not _in_encoding(name, quantized):  # the encoding's parts are stored above, as one record
                self._add(records, entries, group, layer_index, name, _RAW.encode(t.detach().cpu()))
        stored = sum(e.stored_bytes for e in entries)
        if stored > self.max_cache_bytes:
            raise ValueError(
                f"layer {layer_index} of {model_id} takes {stored / GB:.3f} GB, more than max_cache_size_gb="
                f"{self.max_cache_bytes / GB:g}; raise it"
            )
        self._make_room(stored, keep=(vid, group))
        extra = {"model_id": model_id, "layer_index": layer_index, "module": desc,
                 "quantization_mode": str(getattr(quantization_mode, "value", quantization_mode)), "used": time.time()}
        self.store.delete_group(vid, group)
        self.store.put_group(vid, GroupEntry(group, entries, extra=extra), records)
        self._memory_drop((model_id, layer_index))
        logger.debug("cached layer %d of %s: %d records, %.1f MB stored", layer_index, model_id, len(records), stored / 1e6)

    @staticmethod
    def _add(records: dict, entries: list, group: str, layer_index: int, name: str, enc: EncodedTensor) -> None:
        rname = f"{layer_index}.{name}"
        rec, info = encode_record(enc)
        records[rname] = bytes(rec)
        original = enc.numel * torch.empty(0, dtype=dtype_from_name(enc.dtype)).element_size()
        entries.append(TensorEntry(rname, group, enc.codec, list(enc.shape), enc.dtype, original, info.raw_len, info.stored_len,
                                   info.compressed, 0.0, 0.0, params=dict(enc.params)))

    def _layers(self) -> list[tuple[str, GroupEntry]]:
        return list(self.store.iter_groups(VARIANT_PREFIX))

    def size_bytes(self) -> int:
        """Stored bytes of every cached layer."""
        return sum(g.stored_bytes for _, g in self._layers())

    def _flush_used(self) -> None:
        """Write the read times this process holds into the entries (they order evictions)."""
        if not self._used or self.store.readonly:
            return
        self.store.put_meta({f"layer-cache-used/{vid}/{g}": t for (vid, g), t in self._used.items()})
        self._used.clear()

    def _last_used(self, vid: str, g: GroupEntry) -> float:
        t = self._used.get((vid, g.name)) or self.store.get_meta(f"layer-cache-used/{vid}/{g.name}") or 0.0
        return max(t, g.extra.get("used", 0.0))

    def _make_room(self, need: int, keep: tuple[str, str]) -> None:
        layers = [(vid, g) for vid, g in self._layers() if (vid, g.name) != keep]
        total = sum(g.stored_bytes for _, g in layers)
        if total + need <= self.max_cache_bytes:
            return
        for vid, g in sorted(layers, key=lambda vg: self._last_used(*vg)):
            if total + need <= self.max_cache_bytes:
                break
            self.store.delete_group(vid, g.name)
            self.store.put_meta({f"layer-cache-used/{vid}/{g.name}": None})
            self._used.pop((vid, g.name), None)
            total -= g.stored_bytes
            self._memory_drop((g.extra.get("model_id"), g.extra.get("layer_index")))
            logger.info(
                "layer cache over %.2f GB: evicted layer %s of %s (%.1f MB, least recently used)",
                self.max_cache_bytes / GB, g.extra.get("layer_index"), g.extra.get("model_id"), g.stored_bytes / 1e6,
            )

    # -- reading -----------------------------------------------------------------------------
    def has_layer(self, model_id: str, layer_index: int) -> bool:
        return self.store.get_group(self._vid(model_id), layer_group(layer_index)) is not None

    def get_layer(self, model_id: str, layer_index: int) -> nn.Module | None:
        """The module cached as layer ``layer_index`` of ``model_id`` (equal weights, equal
        outputs), or None when it is not cached.

        Raises:
            CorruptRecordError: a record fails its checksum or is cut short.
        """
        key = (model_id, layer_index)
        vid, group = self._vid(model_id), layer_group(layer_index)
        if key in self._memory:
            self._memory.move_to_end(key)
            self._used[(vid, group)] = time.time()
            return self._memory[key][0]
        entry = self.store.get_group(vid, group)
        if entry is None:
            return None
        prefix = f"{layer_index}."
        encoded = {t.name.removeprefix(prefix): self.store.get_record(vid, t.name) for t in entry.tensors}
        desc = entry.extra["module"]
        module = _skeleton(desc, encoded)
        quantized = _quantized(module)
        state = {name: enc.parts["data"] for name, enc in encoded.items() if not _in_encoding(name, quantized)}
        expected = {k for k in module.state_dict() if not _in_encoding(k, quantized)}
        if set(state) != expected:
            raise ValueError(
                f"layer {layer_index} of {model_id} does not rebuild: records {sorted(set(state) ^ expected)} do not match its "
                "module; cache it again"
            )
        module.load_state_dict(state, strict=False, assign=True)
        module.eval()
        self._used[(vid, group)] = time.time()
        self._memory_put(key, module)
        return module

    # -- memory LRU --------------------------------------------------------------------------
    def _memory_put(self, key, module: nn.Module) -> None:
        n = _module_bytes(module)
        if n > self.max_memory_bytes:
            return
        self._memory[key] = (module, n)
        self._memory_bytes += n
        while self._memory_bytes > self.max_memory_bytes:
            _, (_, m) = self._memory.popitem(last=False)
            self._memory_bytes -= m

    def _memory_drop(self, key) -> None:
        hit = self._memory.pop(key, None)
        if hit is not None:
            self._memory_bytes -= hit[1]

    def clear_memory(self) -> None:
        self._memory.clear()
        self._memory_bytes = 0

    def close(self) -> None:
        self._flush_used()
        self.clear_memory()
        self.store.close()

    def __enter__(self) -> "LayerCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
