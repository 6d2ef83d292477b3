"""Running a model one decoder layer at a time over calibration activations, with
transformers' own modules: the skeleton is built on the meta device, one layer's weights are
put in (float32), the layer runs over the activations in micro-batches, and the weights go
back to meta.

The inputs of the first layer, and the keyword arguments every layer gets (position
embeddings, attention mask), are captured from the model's own forward, stopped at the first
layer: whatever an architecture does before its layers (Gemma's embedding scale, rotary
tables) is its own code. Statistics are taken with forward pre-hooks on the linears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.arch import ArchSpec
from runtime.surgery import set_param

logger = logging.getLogger(__name__)

MICRO_BATCH_BYTES = 32 << 20  # widest activation of one micro-batch (float32)


class _Stop(Exception):
    """Ends a forward pass early (after the part being measured has run)."""


def _stop(*_: object) -> None:
    raise _Stop


def put_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put tensors into the model by full name (parameters or buffers)."""
    for name, t in tensors.items():
        mod_name, _, p = name.rpartition(".")
        set_param(model.get_submodule(mod_name), p, t)


def to_meta(module: nn.Module) -> None:
    """Free a module's parameters (back to the meta device)."""
    for m in module.modules():
        for p, v in m._parameters.items():
            if v is not None:
                m._parameters[p] = nn.Parameter(torch.empty(v.shape, dtype=v.dtype, device="meta"), requires_grad=False)


@dataclass
class LinearStats:
    """What the hooks gather for one linear: ``mean(x x^T)`` (GPTQ), ``mean(|x|)`` per
    input channel (AWQ's activation scale) and ``mean(x^2)`` per input channel (the
    importance of :mod:`cache.wgrid`'s grids; the Hessian's diagonal)."""

    hessian: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    sq_mean: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor, *, hessian: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if self.abs_mean is None:
            self.abs_mean = torch.zeros(x.shape[1])
            self.sq_mean = torch.zeros(x.shape[1])
            if hessian:
                self.hessian = torch.zeros(x.shape[1], x.shape[1])
        self.abs_mean += x.abs().sum(0)
        self.sq_mean += x.square().sum(0)
        if hessian:
            self.hessian.addmm_(x.T, x)
        self.tokens += n

    def finish(self) -> "LinearStats":
        if self.tokens:
            self.abs_mean /= self.tokens
            self.sq_mean /= self.tokens
            if self.hessian is not None:
                self.hessian /= self.tokens
        return self


@dataclass
class Walker:
    """A model skeleton whose layers run one at a time.

    Args:
        config: the transformers config.
        arch: where embeddings, layers, norm and head live.
        seqlen: tokens per sample (for sizing micro-batches).
    """

    config: object
    arch: ArchSpec
    seqlen: int
    model: nn.Module = field(init=False)
    layers: nn.ModuleList = field(init=False)
    micro_batch: int = field(init=False)
    _kwargs: dict[int, dict] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model.eval()
        self.layers = self.model.get_submodule(self.arch.layers)
        widest = max(int(getattr(self.config, "intermediate_size", 0) or 0), int(self.config.hidden_size))
        self.micro_batch = max(1, MICRO_BATCH_BYTES // (self.seqlen * widest * 4))

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}"

    def batches(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.micro_batch):
            yield slice(s, min(n, s + self.micro_batch))

    # -- the first layer's inputs ----------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor], others: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Fill ``out`` ``[N, L, hidden]`` with the first layer's inputs for ``ids`` ``[N, L]``.

        Args:
            rows: token ids (unique, sorted) -> their embedding rows ``[k, hidden]`` (as stored).
            others: the embedding group's other tensors (float32), put into the skeleton.
        """
        put_tensors(self.model, others)
        emb = self.model.get_submodule(self.arch.embed)
        for sl in self.batches(ids.shape[0]):
            batch = ids[sl]
            uniq, inverse = torch.unique(batch, return_inverse=True)
            emb._parameters["weight"] = nn.Parameter(rows(uniq).float(), requires_grad=False)
            if hasattr(emb, "padding_idx"):
                emb.padding_idx = None
            hidden, kwargs = self._capture(inverse.view(batch.shape))
            out[sl] = hidden
            self._kwargs.setdefault(batch.shape[0], kwargs)
        to_meta(emb)

    def _capture(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        box: dict = {}

        def hook(mod, args, kwargs):
            box["hidden"] = args[0] if args else kwargs["hidden_states"]
            box["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        if "hidden" not in box:
            raise RuntimeError("the model's forward never reached its first layer")
        return box["hidden"], box["kwargs"]

    def kwargs(self, batch: int) -> dict:
        """The keyword arguments a layer gets for a micro-batch of ``batch`` samples."""
        if batch in self._kwargs:
            return self._kwargs[batch]
        larger = [b for b in self._kwargs if b > batch]
        if not larger:
            raise RuntimeError(f"no layer arguments captured for micro-batches of {batch} or more; call embed() first")
        big = min(larger)
        kw = dict(self._kwargs[big])
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim and mask.shape[0] == big:
            kw["attention_mask"] = mask[:batch]  # the only per-sample argument (position tables broadcast)
        self._kwargs[batch] = kw
        return kw

    # -- one layer ---------------------------------------------------------------------------
    def load(self, i: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Put layer ``i``'s tensors (full names, float32) in; returns the layer."""
        put_tensors(self.model, tensors)
        return self.layers[i]

    def unload(self, i: int) -> None:
        to_meta(self.layers[i])

    @torch.no_grad()
    def run(self, i: int, x: torch.Tensor, out: torch.Tensor | None = None, *, samples: int | None = None,
            stop_after: nn.Module | None = None) -> None:
        """Run layer ``i`` over ``x[:samples]`` micro-batch by micro-batch, writing ``out``
        (when given); ``stop_after``: end each micro-batch once that module has run (its
        statistics are all a caller wants)."""
        layer = self.layers[i]
        n = x.shape[0] if samples is None else samples
        h = stop_after.register_forward_hook(_stop) if stop_after is not None else None
        try:
            for sl in self.batches(n):
                try:
                    y = layer(x[sl], **self.kwargs(sl.stop - sl.start))
                except _Stop:
                    continue
                if out is not None:
                    out[sl] = y[0] if isinstance(y, tuple) else y
        finally:
            if h is not None:
                h.remove()

    def linear_groups(self, i: int, x: torch.Tensor) -> list[list[str]]:
        """Layer ``i``'s linears (names relative to the layer) grouped by shared input, in the
        order they run: ``[[q, k, v], [o], [gate, up], [down]]`` for a Llama layer."""
        layer = self.layers[i]
        seen: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive, so `is` compares them
        hooks = []
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, a[0]))))
        try:
            self.run(i, x, samples=1)
        finally:
            for h in hooks:
                h.remove()
        groups: list[tuple[torch.Tensor, list[str]]] = []
        for name, inp in seen:
            if any(name in g for _, g in groups):
                continue
            for key, g in groups:
                if key is inp:
                    g.append(name)
                    break
            else:
                groups.append((inp, [name]))
        return [g for _, g in groups]

    def collect(self, i: int, x: torch.Tensor, groups: list[list[str]], *, hessian: bool, samples: int | None = None,
                stop: bool = True, out: torch.Tensor | None = None) -> dict[str, LinearStats]:
        """Statistics of the inputs of layer ``i``'s linears over ``x[:samples]``, one per group
        of linears sharing an input (:meth:`linear_groups`; the group's linears get the same
        object). The pass stops after the last linear when ``stop``; else the layer's outputs
        go to ``out`` when given."""
        layer = self.layers[i]
        stats = {g[0]: LinearStats() for g in groups}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0], hessian=hessian)) for n in stats]
        last = groups[-1][-1]
        try:
            self.run(i, x, None if stop else out, samples=samples, stop_after=layer.get_submodule(last) if stop else None)
        finally:
            for h in hooks:
                h.remove()
        for st in stats.values():
            st.finish()
        return {n: stats[g[0]] for g in groups for n in g}

    def inputs_of(self, i: int, x: torch.Tensor, module: nn.Module, *, samples: int) -> torch.Tensor:
        """The input of ``module`` (inside layer ``i``) over ``x[:samples]``, stacked
        ``[samples, L, width]``. A module called with keywords (attention) gets the layer's
        keyword arguments (:meth:`kwargs`) when run again."""
        got: list[torch.Tensor] = []

        def hook(m, args, kwargs):
            got.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        h = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run(i, x, samples=samples, stop_after=module)
        finally:
            h.remove()
        return torch.cat(got)
