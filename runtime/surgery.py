"""Module surgery: putting loaded weights into transformers' own modules and taking them
out again, and the stand-ins for the vocabulary-sized matrices: token embeddings looked up
row by row from their records, the head applied chunk by chunk when it is not kept."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cache.manifest import TensorEntry
from runtime.kernels import Int4CpuKernel, PackedInt4
from runtime.loader import RecordLoader
from runtime.packed import PackedInt4Linear, StackedMember, StackedProjection


def set_param(module: nn.Module, pname: str, t: torch.Tensor) -> None:
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = t
    else:
        raise KeyError(f"{pname} has no place in {type(module).__name__} (neither a parameter nor a buffer)")


def assign(model: nn.Module, tensors: dict[str, torch.Tensor | PackedInt4],
           targets: dict[str, PackedInt4Linear | StackedProjection] | None = None) -> None:
    """Put tensors into the model by their full names; a packed weight goes to its packed
    module (``targets``: derived name -> module, from :func:`runtime.packed.swap_packed_modules`)."""
    for name, t in tensors.items():
        if isinstance(t, PackedInt4):
            if targets is not None and name in targets:
                targets[name].weight_packed = t
            else:
                model.get_submodule(name.rsplit(".", 1)[0]).weight_packed = t
            continue
        module_name, pname = name.rsplit(".", 1)
        try:
            set_param(model.get_submodule(module_name), pname, t)
        except (KeyError, AttributeError) as e:
            raise KeyError(f"{name} from the cache has no place in the {type(model).__name__} skeleton") from e


def empty_weights(layer: nn.Module) -> None:
    """Take a streamed layer's weights out (back to the meta device)."""
    for module in layer.modules():
        if isinstance(module, PackedInt4Linear):
            module.weight_packed = None
        elif isinstance(module, StackedMember):
            module.stack.clear()
        for pname, p in module._parameters.items():
            if p is not None:
                module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def plain_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with default strides. transformers feeds the head ``hidden[:, -1:, :]``, whose
    strides (seq * hidden, hidden, 1) torch's matmul does not fold to a plain matrix product:
    it takes its batched path and copies the whole transposed weight first (192 MB for a
    1 B model's head, on every prefill; found with the memory profiler). A one-row copy of
    the activations avoids it."""
    return x if x.stride() == torch.empty(x.shape, device="meta").stride() else x.clone(memory_format=torch.contiguous_format)


class ChunkedHead(nn.Module):
    """Stands in for the output projection when it is not kept: applies the weight one row
    chunk at a time (decoded, the next chunk on the prefetch thread; or, for a packed head,
    slices of the derived copy's map on the int4 kernel) and fills the logits."""

    def __init__(self, loader: RecordLoader, entry: TensorEntry, bias: torch.Tensor | None, packed: bool) -> None:
        super().__init__()
        self.loader, self.entry, self.bias, self.packed = loader, entry, bias, packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = plain_strides(hidden)
        e, lo = self.entry, self.loader
        out = torch.empty(*hidden.shape[:-1], e.shape[0], dtype=hidden.dtype)
        n = e.num_chunks
        rows_per = e.chunk_rows or e.shape[0]
        if self.packed:
            with lo.packed_head() as w:
                for r0 in range(0, e.shape[0], rows_per):
                    r1 = min(e.shape[0], r0 + rows_per)
                    out[..., r0:r1] = Int4CpuKernel.matmul(hidden, w.rows(r0, r1))
        elif not lo.prefetching:
            for k in range(n):
                lo.apply_chunk(e, k, lambda w, r0=k * rows_per: out[..., r0 : r0 + w.shape[0]].copy_(F.linear(hidden, w)))
        else:
            pending = lo.submit_chunk(e, 0, 0)
            for k in range(n):
                w = lo.await_chunk(pending)
                pending = lo.submit_chunk(e, k + 1, (k + 1) % 2) if k + 1 < n else None
                out[..., k * rows_per : k * rows_per + w.shape[0]] = F.linear(hidden, w)
        if self.bias is not None:
            out += self.bias
        return out


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path``; returns the module it replaced."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def stream_head(model: nn.Module, head_path: str, loader: RecordLoader, entry: TensorEntry, *, packed: bool) -> None:
    """Replace the output projection by a :class:`ChunkedHead`."""
    old = model.get_submodule(head_path)
    bias = old.bias if isinstance(old, (nn.Linear, PackedInt4Linear)) and old.bias is not None and old.bias.device.type != "meta" else None
    replace_module(model, head_path, ChunkedHead(loader, entry, bias, packed))


def lookup_embeddings(module: nn.Module, loader: RecordLoader, entry: TensorEntry, dtype: torch.dtype) -> list:
    """Look token embeddings up row by row from their records: before the embedding module
    runs, its weight becomes just the rows the batch uses and the ids are remapped onto
    them, so the module's own forward (scaling included) runs unchanged; the
    vocabulary-sized matrix is never decoded whole. Returns the hook handles."""
    if hasattr(module, "padding_idx"):
        module.padding_idx = None  # only matters for training; it would index past the gathered rows

    def pre(mod: nn.Module, args):
        ids = args[0]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        mod._parameters["weight"] = nn.Parameter(loader.rows(entry, uniq), requires_grad=False)
        return (inverse.view(ids.shape), *args[1:])

    def post(mod: nn.Module, args, output):
        mod._parameters["weight"] = nn.Parameter(torch.empty(entry.shape, dtype=dtype, device="meta"), requires_grad=False)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
