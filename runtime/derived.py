"""The derived copy: a variant's int4 weights in the CPU kernel's own layout, beside the cache.

The cache stores int4 codes in one portable layout (see :class:`cache.codecs.GroupIntCodec`);
torch's CPU int4 kernel wants a private packing that differs between CPU capabilities, so it
is never written into the cache. :func:`ensure_derived` converts the portable records with
torch's own converter into a *derived copy* (``<cache>/derived/<kernel fingerprint>-v<N>/``),
checking every converted tensor against its dequantized reference before it is written. A
cache moved to another host, or read by another torch, derives its own copy.

What the copy holds is laid out by :func:`derived_layout`, from the manifest alone:

- each eligible linear weight of a decoder layer, packed as it is;
- with ``fuse``, the projections that read the same input stacked into one weight along the
  output rows (``q_proj+k_proj+v_proj``, ``gate_proj+up_proj``): one kernel call where there
  were three, and the decode reads them as one run of memory;
- the output head (the token embeddings when they are tied to it), stitched from its row
  chunks into one weight, so a head kept in memory is one kernel call per token; an int8 head
  (int8 rows with bf16 scales) as two 4-bit planes the same kernel runs
  (:meth:`~runtime.kernels.Int4CpuKernel.split_int8`).

The names of stacked weights (``<parent>.<a>+<b>+<c>.weight``) exist only in the derived copy.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cache.codecs import CodecName
from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, Manifest, TensorEntry, layer_index
from cache.record import EncodedTensor, encode_record
from cache.store import LayerStore
from runtime.kernels import Int4CpuKernel, KernelError, PackedInt4

logger = logging.getLogger(__name__)

DERIVED_DIR = "derived"
# Layout version of the derived copy (what it holds, how names are formed). Part of its path,
# so a copy made by an older sli is never read as this one.
# 2: fused projections and a whole, stitched head
DERIVED_LAYOUT_VERSION = 2
# Projections that read the same input, by their module names under one parent; stacked when
# every member is present, packed and of one group size.
FUSED_PROJECTIONS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class DerivedTensor:
    """One weight of the derived copy: portable int4 records stacked along the output rows.

    ``sources``: the main cache's tensor names, in row order (each with all its row chunks);
    ``rows``: the output rows each contributes; ``modules``: the module paths it serves (one,
    or the members of a stacked projection, in row order)."""

    name: str
    group: str
    sources: tuple[str, ...]
    rows: tuple[int, ...]
    in_features: int
    group_size: int
    modules: tuple[str, ...]
    planes: int = 1  # 2: an int8 weight split into two 4-bit planes

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self.rows), self.in_features)

    @property
    def fused(self) -> bool:
        return len(self.sources) > 1

    @property
    def packed_bytes(self) -> int:
        pk, sz = Int4CpuKernel.shapes(self.shape, self.group_size)
        return self.planes * (pk[0] * pk[1] + 2 * sz[0] * sz[1] * sz[2])


def _eligible(t: TensorEntry) -> bool:
    return t.codec == CodecName.INT4_GROUP.value and t.name.endswith(".weight") and Int4CpuKernel.eligible(t.shape, t.params)


def _splittable(t: TensorEntry) -> bool:
    return t.codec == CodecName.INT8_CHANNEL.value and t.name.endswith(".weight") and Int4CpuKernel.splittable(t.shape, t.params)


def derived_layout(manifest: Manifest, *, head: str, embed: str, fuse: bool = True) -> dict[str, list[DerivedTensor]]:
    """What the derived copy holds for a variant, by group.

    Args:
        manifest: the variant.
        head, embed: module paths of the output head and the token embeddings (``lm_head``,
            ``model.embed_tokens``).
        fuse: stack the projections in :data:`FUSED_PROJECTIONS`.
    """
    out: dict[str, list[DerivedTensor]] = {}
    entries = manifest.tensors()
    for g in manifest.groups:
        if layer_index(g.name) is None:
            continue
        packable = {t.name.removesuffix(".weight"): t for t in g.tensors if _eligible(t)}
        items: list[DerivedTensor] = []
        taken: set[str] = set()
        if fuse:
            for members in FUSED_PROJECTIONS:
                parents = {m.rpartition(".")[0] for m in packable if m.rpartition(".")[2] == members[0]}
                for parent in sorted(parents):
                    mods = [f"{parent}.{m}" for m in members]
                    ts = [packable.get(m) for m in mods]
                    if any(t is None for t in ts) or len({int(t.params["group_size"]) for t in ts}) != 1 \
                            or len({t.shape[1] for t in ts}) != 1:
                        continue
                    items.append(DerivedTensor(
                        f"{parent}.{'+'.join(members)}.weight", g.name, tuple(t.name for t in ts), tuple(t.shape[0] for t in ts),
                        ts[0].shape[1], int(ts[0].params["group_size"]), tuple(mods)))
                    taken.update(mods)
        for mod, t in packable.items():
            if mod not in taken:
                items.append(DerivedTensor(t.name, g.name, (t.name,), (t.shape[0],), t.shape[1], int(t.params["group_size"]), (mod,)))
        if items:
            out[g.name] = items
    h = entries.get(f"{head}.weight") or entries.get(f"{embed}.weight")  # tied: the embeddings are the head
    if h is not None and (_eligible(h) or _splittable(h)):
        split = _splittable(h)
        gs = Int4CpuKernel.split_group_size(h.shape[1]) if split else int(h.params["group_size"])
        out.setdefault(h.group, []).append(DerivedTensor(
            h.name, h.group, (h.name,), (h.shape[0],), h.shape[1], gs, (head,), planes=2 if split else 1))
    return out


def derived_store_path(cache_path: Path, fingerprint: str, *, fused: bool) -> Path:
    """Where the derived copy for a kernel fingerprint (and stacked projections or not) lives beside a cache."""
    name = f"{fingerprint}-v{DERIVED_LAYOUT_VERSION}" + ("" if fused else "-unfused")
    return cache_path / DERIVED_DIR / re.sub(r"[^a-z0-9._-]", "_", name)


def stacked_record(store: LayerStore, vid: str, entries: dict[str, TensorEntry], d: DerivedTensor) -> EncodedTensor:
    """The portable int4 record of a derived tensor: its sources' records (and their row
    chunks) stacked along the rows, as one ``int4_group`` tensor."""
    parts: dict[str, list[torch.Tensor]] = {}
    enc0 = None
    for src in d.sources:
        for rname in entries[src].record_names():
            enc = store.get_record(vid, rname)
            enc0 = enc0 or enc
            for k, v in enc.parts.items():
                parts.setdefault(k, []).append(v)
    joined = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
    return EncodedTensor(enc0.codec, d.shape, enc0.dtype, joined, dict(enc0.params))


def pack_derived(enc: EncodedTensor, d: DerivedTensor) -> PackedInt4:
    """A derived tensor's stacked record in the kernel's layout."""
    return Int4CpuKernel.split_int8(enc) if d.planes == 2 else Int4CpuKernel.pack(enc)


def ensure_derived(store: LayerStore, vid: str, layout: dict[str, list[DerivedTensor]], *, progress: bool = True) -> LayerStore:
    """Open (building what is missing) the derived copy holding ``layout``. Each group is
    written in one transaction, so a killed build resumes; each tensor is checked against its
    dequantized reference before it is written.

    Raises:
        KernelError: the kernel is missing or wrong on this host, or the copy cannot be written.
    """
    kernel = Int4CpuKernel
    kernel.prove()
    path = derived_store_path(store.path, kernel.fingerprint(), fused=any(d.fused for items in layout.values() for d in items))

    def missing(st: LayerStore) -> list[str]:
        return [g for g, items in layout.items() if (e := st.get_group(vid, g)) is None or {t.name for t in e.tensors} != {d.name for d in items}]

    if (path / "data.mdb").exists():
        ro = LayerStore(path, readonly=True)
        if not missing(ro):
            return ro
        ro.close()
    try:
        derived = LayerStore(path)
    except OSError as e:
        raise KernelError(
            f"the packed int4 kernel needs its weights derived into {path}, which cannot be written ({e}); "
            "make the cache directory writable, or compute in float32 (--dtype float32)"
        ) from e
    entries = store.require_manifest(vid).tensors()
    try:
        todo = missing(derived)
        logger.info("deriving %s weights for %d groups into %s", kernel.fingerprint(), len(todo), path)
        for g in tqdm(todo, desc=f"derive {kernel.fingerprint()}", unit="group", disable=not progress):
            _derive_group(store, derived, vid, g, layout[g], entries)
    finally:
        derived.close()
    return LayerStore(path, readonly=True)


def _derive_group(store: LayerStore, derived: LayerStore, vid: str, group: str, items: list[DerivedTensor],
                  entries: dict[str, TensorEntry]) -> None:
    kernel = Int4CpuKernel
    out, records = [], {}
    for d in items:
        enc = stacked_record(store, vid, entries, d)
        w = pack_derived(enc, d)
        kernel.check(enc, w, d.name)
        del enc
        parts = {"packed": w.packed, "scales_and_zeros": w.scales_and_zeros}
        params = {"kernel": kernel.fingerprint(), "group_size": w.group_size, "sources": list(d.sources), "rows": list(d.rows),
                  "planes": w.planes}
        rec, info = encode_record(EncodedTensor("kernel_pack", d.shape, "bfloat16", parts, params), compress_level=0)
        records[d.name] = rec
        src = [entries[s] for s in d.sources]
        out.append(TensorEntry(d.name, group, "kernel_pack", list(d.shape), "bfloat16", sum(t.original_bytes for t in src),
                               info.raw_len, info.stored_len, False, max(t.rel_mse for t in src), max(t.max_abs_err for t in src),
                               params={"group_size": w.group_size}))
    derived.put_group(vid, GroupEntry(group, out), records)


def packed_from_record(enc: EncodedTensor) -> PackedInt4:
    """A derived record's parts as a :class:`PackedInt4` (views into the record), in the kernel's shapes."""
    gs, planes = int(enc.params["group_size"]), int(enc.params.get("planes", 1))
    pk, sz = Int4CpuKernel.shapes((planes * enc.shape[0], enc.shape[1]), gs)
    return PackedInt4(enc.parts["packed"].view(pk), enc.parts["scales_and_zeros"].view(sz), gs, planes)


__all__ = ["DERIVED_LAYOUT_VERSION", "DerivedTensor", "FUSED_PROJECTIONS", "derived_layout", "derived_store_path",
           "ensure_derived", "pack_derived", "packed_from_record", "stacked_record"]
