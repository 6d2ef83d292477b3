"""Layer 3, on a GPU only: the CUDA path against the in-memory reference. Skipped cleanly
where torch sees no CUDA device (every CPU host, this project's CI included)."""

import pytest
import torch

from conftest import dequantized_reference, make_tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"),
]


def _reference_logits(path, ids, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    with torch.no_grad():
        return model(ids.to("cuda")).logits.float().cpu()


def _open(path, cache, mode, dtype, gpu_budget):
    from cache.store import LayerStore
    from runtime.cuda import CudaStreamingModel
    from sli.processor import UniversalSLIProcessor
    from sli.quantization import QuantizationConfig

    vid = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode=mode), cache_dir=cache, progress=False).quantize().variant_id
    store = LayerStore(cache, readonly=True)
    return CudaStreamingModel(store, vid, gpu_budget=gpu_budget, memory_budget="1GB", dtype=dtype, context_tokens=256), store


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("share", ["all", "half", "none"])
def test_mode_none_streamed_logits_equal_the_reference(tmp_path, dtype, tol, share):
    path = make_tiny_model(tmp_path, "llama", layers=12, seed=21)  # half resident must be less than all: a slot holds two layers' worth
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    ref = _reference_logits(path, ids, dtype)
    probe, store = _open(path, tmp_path / "c", "none", dtype, "64GB")
    fixed = sum(probe.plan.gpu_fixed.values())
    n = len(probe.layers)
    layer = probe.plan.gpu_resident_bytes // n  # all resident at 64 GB: each layer in compute form
    slot = layer + max(lay.nbytes for lay in probe.layouts.values())
    probe.close()
    budget = {"all": "64GB", "half": fixed + 2 * slot + (n // 2) * layer, "none": fixed + 2 * slot}[share]
    m, store = _open(path, tmp_path / "c", "none", dtype, budget)
    assert len(m.plan.gpu_resident) == {"all": n, "half": n // 2, "none": 0}[share]
    got = m.logits(ids)
    assert (got - ref).abs().max().item() < tol
    m.close()
    store.close()


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "nf4", "fp4", "int4"])
def test_quantized_modes_equal_the_dequantized_reference(tmp_path, mode):
    from cache.store import LayerStore

    path = make_tiny_model(tmp_path, "llama", layers=4, seed=22)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    m, store = _open(path, tmp_path / "c", mode, torch.float32, "64MB")
    with LayerStore(tmp_path / "c", readonly=True) as st:
        ref_model = dequantized_reference(path, st, m.variant_id)
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (m.logits(ids) - ref).abs().max().item() < 1e-3
    m.close()
    store.close()


def test_no_gpu_memory_growth_over_200_tokens(tmp_path):
    path = make_tiny_model(tmp_path, "llama", layers=4, seed=23)
    m, store = _open(path, tmp_path / "c", "int4", torch.bfloat16, "64MB")
    ids = torch.tensor([[1, 2, 3]])
    m.logits(ids)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for k in range(200):
        m.logits(torch.tensor([[k % 50 + 1]]))
    assert torch.cuda.memory_allocated() <= base + (1 << 20)
    assert m.peak_gpu_bytes() <= m.plan.gpu_budget_bytes
    m.close()
    store.close()
