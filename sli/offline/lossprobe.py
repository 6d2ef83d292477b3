"""What the salience planner measures for a loss target (``--target-loss``): every
candidate codec of every tensor, calibrated, and the perplexity loss of a whole assignment on
a held-out slice of the calibration text.

1. :meth:`LossProbe.measure`: one walk over the unquantized model, layer by layer, on the
   calibration samples; each linear's inputs give its Hessian, and every candidate grid is
   applied with GPTQ (a kept tensor costs its source bytes and no error). Each candidate's
   record goes to a work directory (bounded memory: one layer at a time); its score is its
   bytes and its relative output error ``tr(dW H dW^T) / tr(W H W^T)``. The embeddings and
   the head get round-to-nearest row candidates (a tied matrix is both), scored apart.
2. :meth:`LossProbe.loss`: the perplexity of the held-out windows with a given assignment,
   walked layer by layer (the same bounded memory), against the unquantized model's, in
   percent.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from cache.codecs import CodecName, decode_tensor, get_codec
from cache.manifest import EMBED_GROUP, HEAD_GROUP, layer_group
from cache.record import decode_record, encode_record
from runtime.arch import get_arch
from sli.offline.calibration import CalibrationConfig, calibration_set
from sli.offline.config import QuantizationConfig, is_quantizable, module_matches
from sli.offline.calibrate import split_rows
from sli.offline.gptq import GPTQ_CODECS, gptq_quantize, output_error
from sli.offline.layerwalk import LinearStats, Walker, put_tensors

logger = logging.getLogger(__name__)

KEEP = "keep"


@dataclass(frozen=True)
class Candidate:
    """One codec a tensor may get: ``label`` names it in plans and reports."""

    label: str
    config: QuantizationConfig


def loss_candidates() -> list[Candidate]:
    """Calibrated int3/int4 at several group sizes, int8 per channel, and kept."""
    c = QuantizationConfig
    return [
        Candidate("int3-g32", c(mode="int3", group_size=32)),
        Candidate("int3-g64", c(mode="int3", group_size=64)),
        Candidate("int4-g32", c(mode="int4", group_size=32)),
        Candidate("int4-g64", c(mode="int4", group_size=64)),
        Candidate("int4-g128", c(mode="int4", group_size=128)),
        Candidate("int8", c(mode="int8_dynamic")),
        Candidate(KEEP, c(mode="none")),
    ]


def row_candidates() -> list[Candidate]:
    """For the embeddings and head (rows, round to nearest): int4 rows in groups, int8 rows, kept."""
    c = QuantizationConfig
    return [Candidate("int4-g32", c(mode="int4", group_size=32)), Candidate("int4-g64", c(mode="int4", group_size=64)),
            Candidate("int4-g128", c(mode="int4", group_size=128)), Candidate("int8", c(mode="int8_dynamic")),
            Candidate(KEEP, c(mode="none"))]


@dataclass
class Scores:
    """Per tensor and candidate: (bytes, error). Layer tensors' errors are relative output
    errors; the embeddings' and head's are relative weight errors (their loss is measured apart)."""

    layers: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    rows: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)


class LossProbe:
    """Measures candidates and assignments of one source model (see the module docstring).

    Args:
        source: the model (read one tensor at a time).
        calibration: the text, samples and seqlen; its held-out tokens are the evaluation text.
        work_dir: where candidate records go (removed by :meth:`close`).
        skip_modules: tensors never quantized (kept).
    """

    def __init__(self, source, calibration: CalibrationConfig, work_dir: Path, *, skip_modules=(), progress: bool = True) -> None:
        from sli.offline.calibrate import source_tokenizer

        if calibration.holdout_tokens < 2 * calibration.seqlen:
            raise ValueError(f"a loss target is measured on held-out text: holdout_tokens ({calibration.holdout_tokens}) must be "
                             f"at least two windows of seqlen ({calibration.seqlen})")
        self.source, self.cal, self.progress = source, calibration, progress
        self.config = source.config
        self.arch = get_arch(self.config.model_type)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        sets = calibration_set(calibration, source_tokenizer(source))
        self.samples = sets.samples
        n = sets.holdout.numel() // calibration.seqlen
        self.holdout = sets.holdout[: n * calibration.seqlen].view(n, calibration.seqlen)  # [windows, L]
        self.walker = Walker(self.config, self.arch, calibration.seqlen)
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.skip = tuple(skip_modules)
        self.names = {g: [] for g in self.arch.group_order(self.config.num_hidden_layers)}
        for name in source.tensor_names():
            if self.tied and name == f"{self.arch.head}.weight":
                continue
            self.names[self.arch.group_of(name)].append(name)
        self._ref_nll: float | None = None

    # -- candidate records ---------------------------------------------------------------------
    def _path(self, name: str, label: str) -> Path:
        return self.work / f"{name}@{label}.rec"

    def _save(self, name: str, label: str, enc) -> int:
        rec, info = encode_record(enc, compress_level=0)
        self._path(name, label).write_bytes(rec)
        return enc.nbytes

    def weight(self, name: str, label: str) -> torch.Tensor:
        """A tensor as candidate ``label`` stores it, decoded to float32."""
        if label == KEEP:
            return self.source.read(name).float()
        data = self._path(name, label).read_bytes()
        return decode_tensor(decode_record(name, data), torch.float32)

    @property
    def row_tensors(self) -> list[str]:
        out = [f"{self.arch.embed}.weight"]
        if not self.tied:
            out.append(f"{self.arch.head}.weight")
        return [n for n in out if not module_matches(n.rsplit(".", 1)[0], self.skip)]

    # -- 1. measuring ---------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, candidates: list[Candidate], rows: list[Candidate]) -> Scores:
        scores = Scores()
        for name in self.row_tensors:
            w = self.source.read(name)
            scores.numel[name] = w.numel()
            scores.rows[name] = {}
            for c in rows:
                if c.label == KEEP:
                    scores.rows[name][KEEP] = (w.numel() * w.element_size(), 0.0)
                    continue
                choice = c.config.codec_choice()
                enc = get_codec(choice.codec).encode(w, **choice.params)
                err = float((decode_tensor(enc, torch.float32) - w.float()).pow(2).sum() / w.float().pow(2).sum())
                scores.rows[name][c.label] = (self._save(name, c.label, enc), err)
        x = self._first_inputs(self.samples, {})
        layers = range(self.config.num_hidden_layers)
        for i in tqdm(layers, desc="measure candidates", unit="layer", disable=not self.progress):
            gname = layer_group(i)
            layer = self.walker.load(i, {n: self.source.read(n).float() for n in self.names[gname]})
            prefix = self.walker.layer_prefix(i)
            groups = [[n for n in g if not module_matches(f"{prefix}.{n}", self.skip)
                       and is_quantizable(f"{prefix}.{n}.weight", layer.get_submodule(n).weight)]
                      for g in self.walker.linear_groups(i, x)]
            groups = [g for g in groups if g]
            y = torch.empty_like(x)  # the next layer's inputs, from this one unquantized (the same pass)
            if groups:
                stats = self.walker.collect(i, x, groups, hessian=True, stop=False, out=y)
            else:
                stats = {}
                self.walker.run(i, x, y)
            for group in groups:  # linears sharing an input share a Hessian: one GPTQ call per candidate
                fulls = [f"{prefix}.{n}.weight" for n in group]
                ws = [layer.get_submodule(n).weight.detach() for n in group]
                srcs = [self.source.read(f) for f in fulls]
                h = stats[group[0]].hessian
                for f, w in zip(fulls, ws):
                    scores.numel[f] = w.numel()
                    scores.layers[f] = {}
                stacked = torch.cat(ws)
                for c in candidates:
                    if c.label == KEEP:
                        for f, src in zip(fulls, srcs):
                            scores.layers[f][KEEP] = (src.numel() * src.element_size(), 0.0)
                        continue
                    choice = c.config.codec_choice()
                    if choice.codec not in GPTQ_CODECS:
                        raise ValueError(f"candidate {c.label}: {choice.codec.value} has no grid GPTQ rounds onto")
                    res = gptq_quantize(stacked, h, codec=choice.codec, group_size=choice.params.get("group_size"),
                                        damp=self.cal.damp, block_size=self.cal.block_size, act_order=self.cal.act_order,
                                        weighted_grid=self.cal.importance)
                    r0 = 0
                    for f, w, src in zip(fulls, ws, srcs):
                        r1 = r0 + w.shape[0]
                        enc = split_rows(res.encoded, r0, r1, src)
                        scores.layers[f][c.label] = (self._save(f, c.label, enc), output_error(w, res.weight[r0:r1], h))
                        r0 = r1
            del stats
            self.walker.unload(i)
            x = y
        return scores

    # -- 2. the held-out loss -------------------------------------------------------------------
    def _first_inputs(self, ids: torch.Tensor, choice: dict[str, str], read=None) -> torch.Tensor:
        read = read or (lambda n: self.weight(n, choice.get(n, KEEP)))
        name = f"{self.arch.embed}.weight"
        w = read(name)
        others = {n: read(n) for n in self.names[EMBED_GROUP] if n != name}
        x = torch.empty(ids.shape[0], ids.shape[1], int(self.config.hidden_size))
        self.walker.embed(ids, lambda uniq: w[uniq], others, x)
        return x

    @torch.no_grad()
    def nll(self, choice: dict[str, str], read=None) -> float:
        """Mean negative log-likelihood of the held-out windows with ``choice`` (tensor ->
        candidate label; missing tensors kept), or with the tensors ``read(name)`` gives (a
        built cache's, decoded to float32)."""
        read = read or (lambda n: self.weight(n, choice.get(n, KEEP)))
        x = self._first_inputs(self.holdout, choice, read)
        for i in range(self.config.num_hidden_layers):
            names = self.names[layer_group(i)]
            self.walker.load(i, {n: read(n) for n in names})
            y = torch.empty_like(x)
            self.walker.run(i, x, y)
            self.walker.unload(i)
            x = y
        head_name = f"{self.arch.embed if self.tied else self.arch.head}.weight"
        head = read(head_name)
        norm = {n: read(n) for n in self.names[HEAD_GROUP] if n.startswith(self.arch.norm + ".")}
        put_tensors(self.walker.model, norm)
        norm_mod = self.walker.model.get_submodule(self.arch.norm)
        bias = read(f"{self.arch.head}.bias") if f"{self.arch.head}.bias" in self.names[HEAD_GROUP] else None
        total, count = 0.0, 0
        for k in range(x.shape[0]):  # one window at a time: [L, vocab] logits
            logits = F.linear(norm_mod(x[k]), head, bias)
            softcap = getattr(self.config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            total += float(F.cross_entropy(logits[:-1], self.holdout[k, 1:], reduction="sum"))
            count += logits.shape[0] - 1
        return total / count

    def loss(self, choice: dict[str, str], read=None) -> float:
        """Perplexity loss of ``choice`` (or of what ``read`` gives) on the held-out windows,
        percent over the unquantized model."""
        if self._ref_nll is None:
            self._ref_nll = self.nll({})
        return 100.0 * (math.exp(self.nll(choice, read) - self._ref_nll) - 1.0)

    def cache_loss(self, store, vid: str) -> float:
        """The held-out loss of a built variant (its stored tensors, decoded to float32)."""
        entries = store.require_manifest(vid).tensors()
        return self.loss({}, lambda n: store.read_tensor(vid, entries[n], torch.float32))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
