"""Layer 3: the real model (SmolLM2-135M-Instruct) quantized in every mode, from its HF
folder and from the GGUF file it ships as."""

import pytest
import torch

from cache import LayerStore, decode_tensor
from sli import QuantizationConfig, QuantizationMode, UniversalSLIProcessor, get_mixed_precision_config, open_source

pytestmark = pytest.mark.real

# Upper bounds on the mean relative MSE of the quantized tensors, and lower bounds on the
# on-disk reduction (embeddings stay bf16 by default, uncompressed since zstd saves them
# under a quarter: they are 21% of this model; int4/int2 use groups of 64).
EXPECT = {
    "none": (0.0, 1.0),
    "int8": (1e-3, 1.6),
    "int8_dynamic": (1e-3, 1.6),
    "nf4": (0.03, 2.3),
    "fp4": (0.05, 2.3),
    "int4": (0.03, 2.2),
    "int3": (0.06, 2.4),
    "int2": (0.5, 2.8),
}


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.parametrize("mode", [m.value for m in QuantizationMode])
def test_real_model_every_mode(real_model, real_cache, mode):
    p = UniversalSLIProcessor(real_model, quantization_config=QuantizationConfig(mode=mode), cache_dir=real_cache, progress=False)
    r = p.quantize(validate_memory=mode != "none")
    max_mse, min_reduction = EXPECT[mode]
    assert r.num_parameters == 134_515_008  # tied head stored once
    assert r.built_groups == 32
    assert r.mean_rel_mse <= max_mse
    assert r.reduction_factor >= min_reduction
    if mode != "none":
        # every decoder projection: q, o (576x576), k, v (192x576), gate, up, down (576x1536), 30 layers,
        # and the (tied) token embeddings as int8 rows
        layers = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
        assert r.mean_rel_mse > 0 and r.quantized_parameters == layers + 49152 * 576
    # memory: one group at a time (largest is the 57 MB embedding), never the whole 269 MB model
    assert r.peak_rss_bytes < 3 * r.largest_group_bytes + (64 << 20)
    with LayerStore(real_cache, readonly=True) as st:
        enc = st.get_record(r.variant_id, "model.layers.7.mlp.down_proj.weight")
        w = p.source.read("model.layers.7.mlp.down_proj.weight")
        out = decode_tensor(enc, torch.float32)  # the recorded error is that of the float32 dequantized weight
        assert out.shape == w.shape
        rel = float((out - w.float()).pow(2).mean() / w.float().pow(2).mean())
        assert rel == pytest.approx(r.tensor_errors["model.layers.7.mlp.down_proj.weight"]["rel_mse"], rel=1e-4)


def test_real_model_mixed_precision(real_model, real_cache):
    r = UniversalSLIProcessor(real_model, adaptive_quantizer=get_mixed_precision_config(), cache_dir=real_cache, progress=False).quantize()
    codecs = {e["codec"] for n, e in r.tensor_errors.items() if ".layers." in n and n.endswith("proj.weight")}
    assert codecs == {"int8_outlier", "nf4"}
    assert r.tensor_errors["model.embed_tokens.weight"]["codec"] == "int8_channel"
    # 4.5 bits (nf4) on the FFN, ~8 on attention and the vocabulary rows: between 2.5x and 3x of bf16
    assert 2.5 < r.reduction_factor < 3.0


def test_gguf_reader_matches_transformers_own_gguf_loader(real_gguf):
    """Every tensor sli's lazy GGUF reader yields equals what transformers' own GGUF loader
    (gguf-py dequantizing, transformers renaming and un-permuting) puts in its model."""
    from transformers import AutoModelForCausalLM

    g = open_source(real_gguf)
    assert g.format == "gguf" and g.config.model_type == "llama"
    ref = AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32)
    want = ref.state_dict()
    if ref.config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    assert sorted(g.tensor_names()) == sorted(want)
    for name in g.tensor_names():
        got = g.read(name)
        assert got.shape == want[name].shape and torch.equal(got.float(), want[name]), name
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_parameters"):
        assert getattr(g.config, key) == getattr(ref.config, key), key
    assert "chat_template.jinja" in g.tokenizer_files() or "tokenizer_config.json" in g.tokenizer_files()


def test_quantize_straight_from_gguf(real_gguf, tmp_path):
    r = UniversalSLIProcessor(real_gguf, quantization_config="int4", cache_dir=tmp_path, progress=False).quantize(validate_memory=True)
    assert r.built_groups == 32 and r.original_bytes == 4 * 134_515_008  # GGUF dequantizes to float32
    assert r.mean_rel_mse < 0.03


@pytest.mark.parametrize("plan", ["nf4", "mixed"])
def test_documented_api_quantizes_the_real_model_in_memory(real_model, real_cache, plan):
    """``AdaptiveQuantizer.quantize_model`` on transformers' own model: the same encodings as
    the streaming cache, so the same perplexity (the delta measured there) and the same
    greedy tokens through transformers' ``generate``."""
    from transformers import AutoModelForCausalLM

    from runtime.evaluate import default_text, perplexity
    from sli.quantization import AdaptiveQuantizer, QuantizationConfig, get_nf4_config

    if plan == "nf4":
        base = get_nf4_config(compute_dtype=torch.float32)
        quantizer = AdaptiveQuantizer(base_config=base, attention_config=base, ffn_config=base)
        streaming_plan = get_nf4_config()
    else:
        quantizer = AdaptiveQuantizer(get_mixed_precision_config(compute_dtype=torch.float32))
        streaming_plan = get_mixed_precision_config()
    stream = UniversalSLIProcessor(real_model, quantization_config=streaming_plan, cache_dir=real_cache, progress=False)
    stream.load()
    ids = torch.tensor(stream.tokenizer(default_text())["input_ids"][:512])
    ppl_stream = perplexity(stream.model, ids).perplexity
    prompt = stream.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    streamed_tokens = stream.generate(prompt[0].tolist(), max_new_tokens=8, ignore_eos=True).token_ids
    stream.close()

    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    ppl_ref = perplexity(model, ids).perplexity
    quantizer.quantize_model(model)
    assert sum(type(m).__name__ == "QuantizedLinear" for m in model.modules()) == 30 * 7 + 1  # and the head
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"  # int8 rows, as the cache holds them
    ppl_mem = perplexity(model, ids).perplexity
    assert abs(ppl_mem / ppl_stream - 1) < 1e-3, (ppl_mem, ppl_stream)
    assert ppl_mem > ppl_ref  # quantizing costs something, and the same as streaming measures
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == streamed_tokens
