"""The writer's calibrated path: GPTQ and AWQ one layer at a time (sequential GPTQ).

Groups are built in order, each committed before the next starts:

1. the embeddings, round to nearest with the plan's codec; the first layer's inputs are then
   computed from the *stored* embedding rows;
2. each decoder layer: its source weights (float32) go into transformers' own layer; AWQ
   searches and folds its scales; the linears take their statistics from this layer's inputs,
   which are the outputs of the already-quantized layers before it (inside the layer, each
   projection after the ones feeding it are quantized: "true sequential"), and are quantized
   (GPTQ, or round to nearest on the scaled weights); the quantized layer then computes the
   next layer's inputs. The layer's records and those inputs (a flushed file, named with its
   crc32 in the group's entry) commit together;
3. the head: with GPTQ, an untied output projection is quantized row chunk by row chunk on the
   statistics of the final norm's output.

Memory: one layer in float32, its statistics (a Hessian per distinct input), two activation
buffers (spilled to the cache directory when they do not fit the budget) and AWQ's search
inputs (``awq_samples`` of them). Resuming: the inputs named by the last committed layer are
read back when intact; otherwise they are recomputed from the stored embeddings and layers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from cache.codecs import CodecName, get_codec, tensor_error
from cache.manifest import EMBED_GROUP, HEAD_GROUP, layer_index
from cache.store import LayerStore
from runtime.arch import get_arch
from runtime.memory import release_free_memory
from sli.offline.actstore import ActivationStore
from sli.offline.awq import scale_points, search_point, fold
from sli.offline.calibration import CalibrationConfig, calibration_set
from sli.offline.config import ChannelOrder, GROUP_CODECS, CodecChoice
from sli.offline.gptq import GPTQ_CODECS, GPTQError, gptq_quantize, output_error
from sli.offline.layerwalk import Walker
from sli.offline.quantizer import TensorQuantizer, TensorStats, require_bitsandbytes

logger = logging.getLogger(__name__)


def source_tokenizer(source):
    """The source model's tokenizer (from its files; nothing downloaded)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    files = source.tokenizer_files()
    if not files:
        raise ValueError(f"{source.path} has no tokenizer files: calibration needs the tokenizer to cut its text")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def split_rows(enc, r0: int, r1: int, like: torch.Tensor):
    """Rows ``r0:r1`` of a record whose parts are row-major (every part but the column ``perm``)."""
    from cache.record import EncodedTensor

    parts = {k: (v if k == "perm" else v[r0:r1].contiguous()) for k, v in enc.parts.items()}
    return EncodedTensor(enc.codec, tuple(like.shape), str(like.dtype).removeprefix("torch."), parts, dict(enc.params))


def _perm(order: Any, w: torch.Tensor, abs_mean: torch.Tensor | None) -> torch.Tensor | None:
    order = ChannelOrder(order or "none")
    if order is ChannelOrder.WEIGHT:
        return torch.argsort(w.norm(dim=0), descending=True, stable=True)
    if order is ChannelOrder.ACTIVATION:
        return torch.argsort(abs_mean, descending=True, stable=True)
    return None


class CalibratedBuilder:
    """Builds one variant's groups with calibration (see the module docstring)."""

    def __init__(self, source, plan, calib: CalibrationConfig, store: LayerStore, vid: str, groups: dict[str, list[str]],
                 *, compress_level: int, validate_memory: bool, memory_budget: int | None, progress: bool) -> None:
        self.source, self.plan, self.calib, self.store, self.vid = source, plan, calib, store, vid
        self.groups, self.compress_level, self.validate_memory, self.progress = groups, compress_level, validate_memory, progress
        self.config = source.config
        self.arch = get_arch(self.config.model_type)
        self.quantizer = TensorQuantizer(plan)
        self.points = scale_points(self.config.model_type) if calib.method.awq else ()  # refuses before any work
        self.ids = calibration_set(calib, source_tokenizer(source)).samples  # [N, L]
        self.walker = Walker(self.config, self.arch, calib.seqlen)
        shape = (self.ids.shape[0], calib.seqlen, int(self.config.hidden_size))
        self.acts = ActivationStore(store.path, vid, shape, memory_budget=memory_budget)
        self._said: set[str] = set()
        self.summary: dict[str, Any] = {"activation_bytes": self.acts.nbytes, "spilled": self.acts.spilled,
                                        "micro_batch": self.walker.micro_batch}

    # -- helpers -------------------------------------------------------------------------------
    def _choice(self, name: str, w: torch.Tensor) -> CodecChoice:
        choice = self.plan.choose(name, w)
        require_bitsandbytes(choice.codec)
        return choice

    def embed_quantize(self, name: str, piece: torch.Tensor):
        """The embeddings' group, round to nearest: embedding rows are looked up, not
        multiplied, so there is no activation to order their columns by; a plan asking for
        ``permute="activation"`` stores them in their own order (said in the log)."""
        choice = self.plan.choose(name, piece)
        if choice.params.get("permute") == ChannelOrder.ACTIVATION.value:
            if name not in self._said:
                logger.info("%s: looked up, not multiplied: no activation order, columns kept in place", name)
                self._said.add(name)
            choice = CodecChoice(choice.codec, {k: v for k, v in choice.params.items() if k != "permute"})
        return self.quantizer.quantize_tensor(name, piece, choice=choice)

    def _embedding_rows(self):
        """token ids -> their rows as stored (decoded from the committed embedding records)."""
        entry = next(t for t in self.store.get_group(self.vid, EMBED_GROUP).tensors if t.name == f"{self.arch.embed}.weight")
        per = entry.chunk_rows or entry.shape[0]

        def rows(uniq: torch.Tensor) -> torch.Tensor:
            out = torch.empty(len(uniq), entry.shape[1])
            for k in torch.unique(uniq // per).tolist():
                sel = (uniq // per) == k
                name = entry.record_names()[k]
                chunk = get_codec(self.store.get_record(self.vid, name).codec)
                dec = chunk.decode(self.store.get_record(self.vid, name), torch.float32)
                out[sel] = dec[uniq[sel] - k * per]
            return out

        return rows

    def _stored_group(self, gname: str) -> dict[str, torch.Tensor]:
        entry = self.store.get_group(self.vid, gname)
        return {t.name: self.store.get_record(self.vid, t.name) for t in entry.tensors if not t.chunk_rows}

    def _decoded(self, gname: str) -> dict[str, torch.Tensor]:
        from cache.codecs import decode_tensor

        return {n: decode_tensor(enc, torch.float32) for n, enc in self._stored_group(gname).items()}

    # -- the first layer's inputs --------------------------------------------------------------
    def first_inputs(self) -> torch.Tensor:
        others = {n: t for n, t in self._decoded(EMBED_GROUP).items() if n != f"{self.arch.embed}.weight"}
        x = torch.empty(self.acts.shape)
        self.walker.embed(self.ids, self._embedding_rows(), others, x)
        return x

    def inputs_for(self, pos: int, order: list[str]) -> torch.Tensor:
        """The inputs of group ``order[pos]`` (a layer or the head), every group before it
        committed: read from the file the group before names, else recomputed from the stored
        embeddings and layers. Always captures the layers' keyword arguments first."""
        x = self.first_inputs()
        if pos == 1:
            return x
        entry = self.store.get_group(self.vid, order[pos - 1])
        got = self.acts.open(entry.extra.get("calibration", {}).get("next_inputs"))
        if got is not None:
            return got
        for j in range(pos - 1):  # order[j + 1] is layer j
            logger.info("recomputing calibration inputs: replaying stored layer %d", j)
            self.walker.load(j, self._decoded(order[j + 1]))
            y = torch.empty(self.acts.shape)
            self.walker.run(j, x, y)
            self.walker.unload(j)
            x = y
        return x

    # -- one layer -------------------------------------------------------------------------------
    def calibrate_layer(self, i: int, gname: str, x: torch.Tensor) -> tuple[dict, dict, dict]:
        """AWQ and GPTQ on layer ``i``: returns (encodings name -> (enc, stats), every tensor of
        the group as it is to be read for storing: the source's where nothing changed it, AWQ's
        folds in float32, a record for the group's entry)."""
        names = self.groups[gname]
        src = {n: self.source.read(n) for n in names}
        layer = self.walker.load(i, {n: t.float() for n, t in src.items()})
        prefix = self.walker.layer_prefix(i)
        record: dict[str, Any] = {}
        n_awq = min(self.calib.awq_samples, x.shape[0])
        for point in self.points:
            if all(self._choice(f"{prefix}.{n}.weight", layer.get_submodule(n).weight).codec is CodecName.RAW for n in point.linears):
                continue
            xs = self.walker.inputs_of(i, x, layer.get_submodule(point.linears[0]), samples=n_awq)
            first = self._choice(f"{prefix}.{point.linears[0]}.weight", layer.get_submodule(point.linears[0]).weight)
            alpha, s, err, err0 = search_point(layer, point, xs, self._rtn_for(prefix), self._inspect(layer, point),
                                               grid=self.calib.awq_grid, duo=self.calib.awq_duo, group_size=first.params.get("group_size"))
            fold(layer, point, s)
            record.setdefault("awq", {})[point.prev] = {"alpha": alpha, "error": err, "error_alpha0": err0}
            del xs
        encodings: dict[str, tuple] = {}
        gptq_errors: dict[str, list[float]] = {}
        todo = [[n for n in g if self._choice(f"{prefix}.{n}.weight", layer.get_submodule(n).weight).codec is not CodecName.RAW]
                for g in self.walker.linear_groups(i, x)]
        todo = [g for g in todo if g]
        need_stats = self.calib.method.gptq or self.calib.importance or any(self._order(f"{prefix}.{n}.weight") is ChannelOrder.ACTIVATION for g in todo for n in g)
        passes = [[g] for g in todo] if self.calib.true_sequential else [todo]
        for groups in passes:
            stats = self.walker.collect(i, x, groups, hessian=self.calib.method.gptq) if need_stats and groups else {}
            for group in groups:
                group_stats = stats.pop(group[0], None)  # freed once the group is quantized
                for n in group[1:]:
                    stats.pop(n, None)
                for names_together in self._together(prefix, layer, group):
                    done = self._quantize_linears([f"{prefix}.{n}.weight" for n in names_together],
                                                  [layer.get_submodule(n).weight.detach() for n in names_together],
                                                  [src[f"{prefix}.{n}.weight"] for n in names_together], group_stats)
                    for n, (enc, wq, errs) in zip(names_together, done):
                        full = f"{prefix}.{n}.weight"
                        mod = layer.get_submodule(n)
                        w = mod.weight.detach().clone()
                        with torch.no_grad():
                            mod.weight.copy_(wq)
                        encodings[full] = (enc, self._stats(w, wq, enc, src[full]))
                        if errs is not None:
                            gptq_errors[full] = errs
                del group_stats
        if gptq_errors:
            record["gptq"] = gptq_errors
        # what the group stores: the source bytes where nothing changed them, AWQ's folds in float32
        tensors = {}
        for n in names:
            mod_name, _, p = n[len(prefix) + 1 :].rpartition(".")
            mod = layer.get_submodule(mod_name)
            cur = mod._parameters.get(p) if p in mod._parameters else mod._buffers.get(p)
            changed = n not in encodings and cur is not None and not torch.equal(cur.detach(), src[n].float())
            tensors[n] = cur.detach().clone() if changed else src[n]
        return encodings, tensors, record

    def _order(self, name: str) -> ChannelOrder:
        cfg = self.plan.config_for(name) if hasattr(self.plan, "config_for") else self.plan
        return ChannelOrder(cfg.permute)

    def _rtn_for(self, prefix: str):
        def quantize(n: str, w: torch.Tensor) -> torch.Tensor:
            choice = self._choice(f"{prefix}.{n}.weight" if prefix else f"{n}.weight", w)
            if choice.codec is CodecName.RAW:
                return w
            params = {k: v for k, v in choice.params.items() if k != "permute"}
            return get_codec(choice.codec).fake_quantize(w, **params)

        return quantize

    def _inspect(self, layer, point):
        module = layer.get_submodule(point.inspect)
        walker = self.walker

        def run(x: torch.Tensor) -> list[torch.Tensor]:
            outs = []
            for sl in walker.batches(x.shape[0]):
                if point.inspect == "self_attn":
                    y = module(hidden_states=x[sl], **walker.kwargs(sl.stop - sl.start))
                else:
                    y = module(x[sl])
                outs.append(y[0] if isinstance(y, tuple) else y)
            return outs

        return run

    def _together(self, prefix: str, layer, group: list[str]) -> list[list[str]]:
        """A group's linears split into runs that one GPTQ call can take at once: the same
        input (hence Hessian), the same codec and parameters, no per-weight channel order
        (GPTQ's rows are independent, so stacking them changes nothing but the loop count)."""
        runs: dict[str, list[str]] = {}
        for n in group:
            choice = self._choice(f"{prefix}.{n}.weight", layer.get_submodule(n).weight)
            key = repr((choice.codec, sorted(choice.params.items()))) if choice.params.get("permute") != "weight" else n
            runs.setdefault(key, []).append(n)
        return list(runs.values())

    def _quantize_linears(self, names: list[str], ws: list[torch.Tensor], likes: list[torch.Tensor], stats) -> list[tuple]:
        """Quantize weights that share an input and a codec choice: (encoding, dequantized
        weight, [GPTQ output error, round-to-nearest's] or None) each."""
        if len(names) == 1 or not self.calib.method.gptq:
            return [self._quantize_linear(n, w, like, stats) for n, w, like in zip(names, ws, likes)]
        rows = [w.shape[0] for w in ws]
        stacked = torch.cat(ws)
        enc, wq, _ = self._quantize_linear(names[0], stacked, torch.empty(stacked.shape, dtype=likes[0].dtype, device="meta"), stats)
        out, r0 = [], 0
        for n, w, like, r in zip(names, ws, likes, rows):
            part = split_rows(enc, r0, r0 + r, like)
            wq_n = wq[r0 : r0 + r]
            errs = [output_error(w, wq_n, stats.hessian),
                    output_error(w, self._rtn_for("")(n.removesuffix(".weight"), w), stats.hessian)]
            out.append((part, wq_n, errs))
            r0 += r
        return out

    def _quantize_linear(self, name: str, w: torch.Tensor, like: torch.Tensor, stats) -> tuple:
        choice = self._choice(name, w)
        perm = _perm(choice.params.get("permute"), w, stats.abs_mean if stats is not None else None)
        params = {k: v for k, v in choice.params.items() if k != "permute"}
        if self.calib.method.gptq:
            if choice.codec not in GPTQ_CODECS:
                raise GPTQError(f"{name}: the plan gives it {choice.codec.value}, which GPTQ cannot round onto (it needs "
                                f"{[c.value for c in GPTQ_CODECS]}); use --calibrate awq for this mode, or another mode")
            res = gptq_quantize(w, stats.hessian, codec=choice.codec, group_size=params.get("group_size"),
                                symmetric=bool(params.get("symmetric")), act_order=self.calib.act_order, damp=self.calib.damp,
                                block_size=self.calib.block_size, perm=perm, weighted_grid=self.calib.importance)
            enc = res.encoded
            enc.dtype = str(like.dtype).removeprefix("torch.")
            return enc, res.weight, [res.output_error, res.rtn_output_error]
        codec = get_codec(choice.codec)
        if perm is not None and choice.codec not in GROUP_CODECS:
            raise ValueError(f"{name}: channel permutation applies to the group codecs, not {choice.codec.value}")
        if self.calib.importance and choice.codec in GROUP_CODECS and stats is not None:
            params["importance"] = stats.sq_mean  # importance-weighted grids (cache.wgrid)
        enc = codec.encode(w, **params, **({"perm": perm} if perm is not None else {}))
        enc.dtype = str(like.dtype).removeprefix("torch.")
        return enc, codec.decode(enc, torch.float32), None

    @staticmethod
    def _stats(w: torch.Tensor, wq: torch.Tensor, enc, like: torch.Tensor) -> TensorStats:
        err = tensor_error(w, wq)
        return TensorStats(like.numel() * like.element_size(), enc.nbytes, err["rel_mse"], err["max_abs_err"])

    # -- the head --------------------------------------------------------------------------------
    def head_quantizer(self, x: torch.Tensor):
        """``quantize(name, piece)`` for the head group: GPTQ on the untied output projection's
        row chunks when the method and its codec call for it, the plan's codec otherwise."""
        head = f"{self.arch.head}.weight"
        names = self.groups[HEAD_GROUP]
        if not self.calib.method.gptq or head not in names:
            return self.quantizer.quantize_tensor
        w = self.source.read(head)
        if self._choice(head, w).codec is CodecName.RAW:
            return self.quantizer.quantize_tensor
        norm = {n: self.source.read(n).float() for n in names if n.startswith(self.arch.norm + ".")}
        from sli.offline.layerwalk import LinearStats, put_tensors

        put_tensors(self.walker.model, norm)
        norm_mod = self.walker.model.get_submodule(self.arch.norm)
        stats = LinearStats()
        with torch.no_grad():
            for sl in self.walker.batches(x.shape[0]):
                stats.add(norm_mod(x[sl]), hessian=True)
        stats.finish()

        def quantize(name: str, piece: torch.Tensor):
            if name != head:
                return self.quantizer.quantize_tensor(name, piece)
            enc, wq, _ = self._quantize_linear(name, piece.float(), piece, stats)
            return enc, self._stats(piece.float(), wq, enc, piece)

        return quantize

    def close(self) -> None:
        self.acts.remove_all()


def build_calibrated(builder: CalibratedBuilder, order: list[str], todo: list[str], *, put_group, sync, after_commit) -> None:
    """Build the groups in ``todo`` (in ``order``) with ``builder``.

    Args:
        put_group: ``(gname, read, quantize, extra) -> entry``: quantizes and sends a group to the committer.
        sync: waits until every group sent has committed.
        after_commit: ``fn`` -> runs ``fn`` once every group sent so far has committed.
    """
    todo_set = set(todo)
    bar = tqdm(total=len(order), initial=len(order) - len(todo), desc=f"calibrate {builder.source.path.name}", unit="group",
               disable=not builder.progress)
    try:
        if EMBED_GROUP in todo_set:
            put_group(EMBED_GROUP, builder.source.read, builder.embed_quantize, {})
            bar.update()
        sync()  # the first layer's inputs come from the stored embeddings
        first = next((k for k, g in enumerate(order) if g in todo_set and g != EMBED_GROUP), None)
        if first is None:
            return
        x = builder.inputs_for(first, order)
        for k in range(first, len(order)):
            gname = order[k]
            i = layer_index(gname)
            if i is None:  # the head
                if gname in todo_set:
                    put_group(gname, builder.source.read, builder.head_quantizer(x), {})
                    bar.update()
                continue
            t0 = time.perf_counter()
            encodings, tensors, record = builder.calibrate_layer(i, gname, x)
            y = builder.acts.new(f"inputs-{i + 1}")
            builder.walker.run(i, x, y)
            builder.walker.unload(i)
            record["next_inputs"] = builder.acts.commit(f"inputs-{i + 1}", y).to_dict()
            record["seconds"] = time.perf_counter() - t0

            def read(n, tensors=tensors):
                return tensors[n]

            def quantize(n, piece, encodings=encodings):
                return encodings[n] if n in encodings else builder.quantizer.quantize_tensor(n, piece)

            put_group(gname, read, quantize, {"calibration": record})
            after_commit(lambda i=i: builder.acts.release(f"inputs-{i}"))
            x = y
            release_free_memory()
            bar.update()
            _log_layer(gname, record)
    finally:
        bar.close()


def _log_layer(gname: str, record: dict) -> None:
    awq = ", ".join(f"{p} alpha {r['alpha']:.2f}" for p, r in record.get("awq", {}).items())
    g = record.get("gptq", {})
    if g:
        gain = sum(e[1] for e in g.values()) / max(sum(e[0] for e in g.values()), 1e-30)
        logger.info("%s: %.1fs; %s%sGPTQ output error %.2fx below round-to-nearest", gname, record["seconds"], awq, "; " if awq else "", gain)
    else:
        logger.info("%s: %.1fs; %s", gname, record["seconds"], awq)
