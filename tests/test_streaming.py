"""The read path: streamed logits and greedy output against transformers in memory."""

import pytest
import torch

from cache import LayerStore
from conftest import TINY_TYPES, dequantized_reference, make_tiny_model
from runtime.budget import BudgetTooSmallError, MemoryBudget, Unit
from runtime.executor import PackedInt4Linear, StreamingModel
from runtime.packed import StackedMember
from runtime.generate import GenerationOutput, SamplingConfig, generate, stream
from sli import QuantizationConfig, UniversalSLIProcessor


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


CTX = 64  # a fixed KV reservation, so budgets below differ only in weights


def _budgets(model: StreamingModel) -> dict[str, int]:
    """Budgets that hold everything, stream some of the layers (room for the head and one layer
    beside the two slots), and the minimum."""
    n = len(model.layers)
    per_layer = max(u.resident_bytes for u in model.units if u.uses_slot)
    head = next(u.resident_bytes for u in model.units if u.name == "head")
    return {"all": model.full_bytes, "half": model.minimum_bytes + head + per_layer, "min": model.minimum_bytes}


def test_planner_step_by_step():
    units = [Unit(f"layer.{i}", 100, 40 + i) for i in range(6)] + [Unit("head", 120, 30, uses_slot=False)]
    fixed = {"kv cache": 300, "activations": 50}
    everything = MemoryBudget(2000).plan(units, fixed=fixed, streaming_fixed={"chunk buffers": 20}, resident_extra={"embeddings": 500})
    assert everything.streamed == () and everything.resident_layers == tuple(range(6))
    assert everything.bytes_read_per_pass == 0 and everything.fixed["embeddings"] == 500
    # 350 fixed + 20 chunk buffers + 2 slots of 100 leaves 130: the head (ratio 0.25) loses to layer 5 (0.45)
    tight = MemoryBudget(700).plan(units, fixed=fixed, streaming_fixed={"chunk buffers": 20}, resident_extra={"embeddings": 500})
    assert tight.resident == ("layer.5",) and "embeddings" not in tight.fixed
    assert tight.planned_bytes <= 700
    assert tight.bytes_read_per_pass == sum(40 + i for i in range(5)) + 30
    with pytest.raises(BudgetTooSmallError, match=r"below the 0\.0 MiB needed .*kv cache .*2 streaming slots .*--memory-budget 1MB"):
        MemoryBudget(569).plan(units, fixed=fixed, streaming_fixed={"chunk buffers": 20})
    with pytest.raises(ValueError, match="cannot read 'lots' as a size"):
        MemoryBudget("lots")
    assert MemoryBudget("2GiB").bytes == 2 << 30 and MemoryBudget("512MB").bytes == 512_000_000


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_streamed_logits_match_transformers(tmp_path, tiny_root, model_type):
    path = make_tiny_model(tiny_root, model_type, layers=6, seed=21)
    r = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, progress=False).quantize()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _reference(path)(ids).logits
    with LayerStore(tmp_path, readonly=True) as st:
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=CTX)
        budgets = _budgets(probe)
        probe.close()
        streamed = {}
        for label, budget in budgets.items():
            m = StreamingModel(st, r.variant_id, memory_budget=budget, context_tokens=CTX)
            streamed[label] = (len(m.plan.streamed_layers), "head" in m.plan.streamed)
            got = m.logits(ids)
            assert (got - want).abs().max().item() < 1e-4, (label, model_type)
            m.close()
    assert streamed["all"] == (0, False) and streamed["min"] == (6, True)
    assert 0 < streamed["half"][0] < 6


def test_quantized_mode_matches_transformers_on_dequantized_weights(tmp_path, tiny_llama):
    r = UniversalSLIProcessor(tiny_llama, quantization_config="nf4", cache_dir=tmp_path, progress=False).quantize()
    with LayerStore(tmp_path, readonly=True) as st:
        ref = dequantized_reference(tiny_llama, st, r.variant_id)
        m = StreamingModel(st, r.variant_id, memory_budget=1 << 40)
        ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref(ids).logits
        assert (m.logits(ids) - want).abs().max().item() < 1e-4


def test_budget_too_small_and_context_overflow(tmp_path, tiny_llama):
    r = UniversalSLIProcessor(tiny_llama, quantization_config="none", cache_dir=tmp_path, progress=False).quantize()
    with LayerStore(tmp_path, readonly=True) as st:
        with pytest.raises(BudgetTooSmallError, match=r"budget .* is below the .* needed for the fixed costs"):
            StreamingModel(st, r.variant_id, memory_budget="100KB", context_tokens=CTX)
        m = StreamingModel(st, r.variant_id, memory_budget=1 << 40)
        with pytest.raises(ValueError, match="exceeds the model's context of 256"):
            generate(m, torch.ones(1, 250, dtype=torch.long), SamplingConfig(max_new_tokens=10))


def test_sampling_is_seeded_and_greedy_is_argmax(tmp_path, tiny_llama):
    r = UniversalSLIProcessor(tiny_llama, quantization_config="none", cache_dir=tmp_path, progress=False).quantize()
    with LayerStore(tmp_path, readonly=True) as st:
        m = StreamingModel(st, r.variant_id, memory_budget=1 << 40)
        ids = torch.tensor([[5, 6, 7, 8]])
        a = generate(m, ids, SamplingConfig(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=3))
        b = generate(m, ids, SamplingConfig(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=3))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 8
        ref = _reference(tiny_llama)
        want = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, 4:].tolist()
        out = GenerationOutput()
        steps = [s.token_id for s in stream(m, ids, SamplingConfig(max_new_tokens=8), out)]
        assert steps == out.token_ids == want
        assert out.stats.prompt_tokens == 4 and out.stats.new_tokens == 8 and out.stats.stop_reason == "length"


@pytest.mark.real
def test_real_model_streams_exactly(real_model, tmp_path):
    from transformers import AutoTokenizer

    p = UniversalSLIProcessor(real_model, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, progress=False)
    r = p.quantize()
    tok = AutoTokenizer.from_pretrained(str(real_model))
    ids = tok("Layer streaming lets a small computer run a model larger than its memory, because", return_tensors="pt").input_ids
    ref = _reference(real_model)
    with torch.no_grad():
        want = ref(ids).logits
    with LayerStore(tmp_path, readonly=True) as st:
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=256)
        budgets = _budgets(probe)
        for label, budget in budgets.items():
            m = StreamingModel(st, r.variant_id, memory_budget=budget, context_tokens=256)
            assert (m.logits(ids) - want).abs().max().item() < 1e-4, label
            m.close()
        # greedy, 64 tokens, identical to transformers (all layers resident here; streaming is checked above)
        want_ids = ref.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :].tolist()
        assert generate(probe, ids, SamplingConfig(max_new_tokens=64)).token_ids == want_ids


@pytest.mark.real
def test_processor_generate_text(real_model, tmp_path):
    p = UniversalSLIProcessor(real_model, quantization_config="nf4", cache_dir=tmp_path, memory_budget="250MB", progress=False)
    res = p.generate("The capital of France is", max_new_tokens=12)
    assert len(res.token_ids) == res.stats.new_tokens > 0 and "Paris" in res.text
    assert res.stats.bytes_read_per_token > 0  # layers were streamed at this budget
    assert len(p.model.plan.streamed_layers) > 0
    p.close()


def test_prefetch_gives_the_same_tokens_and_counts_loads(tmp_path, tiny_root):
    path = make_tiny_model(tiny_root, "qwen2", layers=6, seed=4)
    r = UniversalSLIProcessor(path, quantization_config="int4", cache_dir=tmp_path, progress=False).quantize()
    ids = torch.tensor([[3, 9, 27, 81]])
    with LayerStore(tmp_path, readonly=True) as st:
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=CTX)
        budget = _budgets(probe)["min"]
        probe.close()
        runs = {}
        for prefetch in (False, True):
            m = StreamingModel(st, r.variant_id, memory_budget=budget, context_tokens=CTX, prefetch=prefetch)
            out = generate(m, ids, SamplingConfig(max_new_tokens=6))
            runs[prefetch] = (out.token_ids, m.stats)
            m.close()
    assert runs[False][0] == runs[True][0]
    for _, stats in runs.values():
        assert stats.layers_loaded == 6 * 6  # six streamed layers, six forward passes
        assert stats.prefetch_hits + stats.prefetch_misses == 36
    assert runs[False][1].prefetch_hits == 0


@pytest.mark.real
def test_cli_generate_under_a_budget(real_model, tmp_path, capsys):
    from sli.cli import main

    rc = main(["generate", str(real_model), "--cache", str(tmp_path), "--mode", "nf4", "--memory-budget", "200MB",
               "--prompt", "The capital of France is", "--max-new-tokens", "8"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The capital of France is") and "Paris" in captured.out
    assert "through 2 slots" in captured.err and "read per token" in captured.err


def test_vocabulary_matrices_stream_in_row_chunks(tmp_path, tiny_root, monkeypatch):
    """Embeddings looked up chunk by chunk and the head applied chunk by chunk give the same logits."""
    import sli.offline.writer

    monkeypatch.setattr(sli.offline.writer, "CHUNK_DECODED_BYTES", 16 << 10)  # tiny chunks: several per matrix
    for model_type, tied in (("llama", True), ("qwen2", False)):
        path = make_tiny_model(tiny_root, model_type, layers=3, seed=8, tie_word_embeddings=tied)
        cache = tmp_path / model_type
        r = UniversalSLIProcessor(path, quantization_config="int8", cache_dir=cache, progress=False).quantize()
        ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
        with LayerStore(cache, readonly=True) as st:
            m = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=CTX)
            assert m.embed_entry.num_chunks > 2 and m.tied == tied
            want = m.logits(ids)
            low = StreamingModel(st, r.variant_id, memory_budget=m.minimum_bytes, context_tokens=CTX)
            assert "head" in low.plan.streamed
            got = low.logits(ids)
            assert low.stats.chunks_loaded >= m.head_entry.num_chunks
            assert (got - want).abs().max().item() < 1e-4, model_type
            # greedy decoding through the chunked path matches the resident one
            a = generate(m, ids[:1], SamplingConfig(max_new_tokens=5)).token_ids
            assert generate(low, ids[:1], SamplingConfig(max_new_tokens=5)).token_ids == a


def test_a_batch_shares_layer_loads_and_matches_single_prompts(tmp_path, tiny_llama):
    r = UniversalSLIProcessor(tiny_llama, quantization_config="none", cache_dir=tmp_path, progress=False).quantize()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43, 44]]
    with LayerStore(tmp_path, readonly=True) as st:
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=CTX)
        m = StreamingModel(st, r.variant_id, memory_budget=probe.minimum_bytes, context_tokens=CTX)
        singles = []
        for p in prompts:
            singles.append(generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=6)).token_ids)
        per_single = m.stats.layers_loaded
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = generate(m, ids, SamplingConfig(max_new_tokens=6), attention_mask=mask)
        assert out.batch_token_ids == singles
        # one pass per step for the whole batch, where the singles took one per step each
        assert m.stats.layers_loaded == per_single == 6 * len(m.plan.streamed_layers)
        assert out.stats.prompt_tokens == sum(map(len, prompts)) and out.stats.new_tokens == 18


def test_request_beyond_the_budgets_kv_reservation_is_refused(tmp_path, tiny_llama):
    r = UniversalSLIProcessor(tiny_llama, quantization_config="none", cache_dir=tmp_path, progress=False).quantize()
    with LayerStore(tmp_path, readonly=True) as st:
        m = StreamingModel(st, r.variant_id, memory_budget=1 << 40, context_tokens=32)
        with pytest.raises(ValueError, match=r"need KV for 40 tokens .* reserves 32 tokens; raise --memory-budget by about"):
            generate(m, torch.ones(1, 30, dtype=torch.long), SamplingConfig(max_new_tokens=10))


@pytest.mark.real
def test_stop_strings_and_prompt_lists(real_model, tmp_path):
    p = UniversalSLIProcessor(real_model, quantization_config="int8", cache_dir=tmp_path, memory_budget="150MB", progress=False)
    full = p.generate("The capital of France is", max_new_tokens=12)
    cut = p.generate("The capital of France is", max_new_tokens=12, stop=["."])
    assert "." in full.text and cut.text == full.text[: full.text.index(".")]
    assert cut.stats.stop_reason == "stop" and cut.stats.new_tokens < full.stats.new_tokens
    many = p.generate(["The capital of France is", "Water boils at"], max_new_tokens=8)
    assert many.texts[0] == p.generate("The capital of France is", max_new_tokens=8).text
    assert len(many.texts) == 2 and many.texts[1]
    p.close()


@pytest.mark.real
@pytest.mark.parametrize("budget", ["64MB", "100MB", "160MB"])
def test_peak_memory_stays_within_the_budget(real_model, tmp_path, budget):
    """Whole process: model build, tokenizer and generation, sampled in a fresh interpreter."""
    from runtime.memory import parse_size
    from sli.bench import _run_point

    UniversalSLIProcessor(real_model, quantization_config="int4", cache_dir=tmp_path, progress=False).quantize()
    spec = {"kind": "sli", "model": str(real_model), "mode": "int4", "cache_dir": str(tmp_path), "budget": budget,
            "prompt": "Tell me about the history of printing.", "new_tokens": 16}
    res, err = _run_point(spec, timeout_s=300)
    assert not err, err
    allowance = 40 << 20  # tokenizer, interpreter and transformers' own objects, outside the runtime's plan
    assert res["streamed_layers"] > 0
    assert res["peak_rss_bytes"] <= parse_size(budget) + allowance, (res["peak_rss_bytes"] / 1e6, res["plan"])


def test_packed_int4_kernel_matches_dequantized_weights(tmp_path, tiny_root):
    """bf16 compute on packed int4 weights (torch's CPU kernel) against transformers running
    the dequantized weights in fp32, resident and streamed; the packed form also lets more
    layers stay resident at the same budget."""
    path = make_tiny_model(tiny_root, "llama", layers=4, seed=12, hidden=256)  # layers larger than the streaming buffers
    r = UniversalSLIProcessor(path, quantization_config="int4", cache_dir=tmp_path, progress=False).quantize()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    with LayerStore(tmp_path, readonly=True) as st:
        ref = dequantized_reference(path, st, r.variant_id)
        with torch.no_grad():
            want = ref(ids).logits
        full = StreamingModel(st, r.variant_id, memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=CTX)
        layers = [n for n in full.packed if n.startswith("model.layers.")]  # the head runs packed too (int8 rows split)
        assert len(layers) == 4 * 7 and all(isinstance(full.model.get_submodule(n.removesuffix(".weight")), (PackedInt4Linear, StackedMember))
                                            for n in layers)
        # no page cache counted beyond the budget (page_cache=0), the smallest budget: the layers stream
        probe = StreamingModel(st, r.variant_id, memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=CTX, page_cache=0)
        probe.close()
        low = StreamingModel(st, r.variant_id, memory_budget=probe.minimum_bytes, dtype=torch.bfloat16, context_tokens=CTX,
                             page_cache=0)
        assert len(low.plan.streamed_layers) == 4
        plain = StreamingModel(st, r.variant_id, memory_budget=1 << 40, dtype=torch.bfloat16, context_tokens=CTX, packed_int4=False)
        scale = want.abs().max().item()
        for m in (full, low, plain):
            err = (m.logits(ids) - want).abs().max().item()
            assert err < 0.03 * scale, (err, scale)  # bf16 activations
        assert (full.logits(ids) - low.logits(ids)).abs().max().item() == 0.0  # streaming changes nothing
        assert full.plan.resident_bytes < plain.plan.resident_bytes / 3
        with pytest.raises(ValueError, match="computes in bfloat16"):
            StreamingModel(st, r.variant_id, memory_budget=1 << 40, packed_int4=True)


@pytest.mark.parametrize("tied", [True, False])
def test_prefill_does_not_copy_the_resident_head(tmp_path, tiny_root, tied):
    """transformers hands the head ``hidden[:, -1:, :]``; with those strides torch's matmul
    copied the whole transposed head on every prefill (a head's size above the budget).
    The head is made large here so a copy of it stands out from everything else."""
    from runtime.memory import PeakMemorySampler

    path = make_tiny_model(tiny_root, "llama", layers=2, seed=7, vocab=16384, hidden=512, tie_word_embeddings=tied)
    p = UniversalSLIProcessor(path, quantization_config="int4", cache_dir=tmp_path, progress=False)
    p.quantize()
    store = LayerStore(tmp_path, readonly=True)
    m = StreamingModel(store, p.variant_id, memory_budget=1 << 40, dtype=torch.bfloat16)
    head_bytes = 16384 * 512 * 2  # 16 MiB
    ids = torch.arange(5, 37)[None]
    m.forward(ids, use_cache=False, logits_to_keep=1)  # first-call allocations out of the way
    with PeakMemorySampler(interval=0.0002) as mem:
        for _ in range(3):
            out = m.forward(ids, use_cache=False, logits_to_keep=1)
    assert out.logits.shape[1] == 1
    assert mem.peak_bytes < head_bytes // 2, mem.peak_bytes / 2**20
    m.close()
    store.close()
