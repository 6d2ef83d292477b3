"""Layer 2: the documented quantization API (``../shared/spec/quantization-api.md``), example by
example, with ``src.nexus_final.sli`` read as ``sli``. Each test transcribes one example and
checks what its text says happens, against a reference (the float layer, the dequantized
weights), never against bytes another library wrote."""

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cache.errors import CorruptRecordError
from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# relative error of a linear layer's output on random inputs, quantized against float:
# what each codec's grid allows (measured on Linear(1024, 4096): nf4 0.09, fp4 0.11, int4 0.064, int8 0.004)
OUTPUT_ERROR_BOUND = {"nf4": 0.15, "fp4": 0.18, "int4": 0.1, "int8": 0.01, "int8_dynamic": 0.01}


@pytest.fixture(autouse=True)
def _fresh_registry():
    from sli.quantization import QuantizationRegistry

    yield
    QuantizationRegistry.reset()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# -- Supported modes ----------------------------------------------------------------------------
def test_mode_examples():
    from sli.quantization import QuantizationConfig, QuantizationMode

    config = QuantizationConfig(mode=QuantizationMode.NONE)
    assert config.mode is QuantizationMode.NONE
    config = QuantizationConfig(
        mode=QuantizationMode.INT8,
        llm_int8_threshold=6.0,  # Outlier threshold
        llm_int8_skip_modules=["lm_head", "embed_tokens"],
    )
    assert config.llm_int8_threshold == 6.0 and config.llm_int8_skip_modules == ["lm_head", "embed_tokens"]
    config = QuantizationConfig(mode=QuantizationMode.INT8_DYNAMIC)
    assert config.mode.value == "int8_dynamic"
    config = QuantizationConfig(
        mode=QuantizationMode.NF4,
        compute_dtype=torch.float16,
        double_quant=True,  # Nested quantization for better accuracy
        compress_statistics=True,
    )
    assert config.compute_dtype is torch.float16 and config.quant_type == "nf4"
    config = QuantizationConfig(mode=QuantizationMode.FP4, quant_type="fp4")
    assert config.quant_type == "fp4"
    assert [m.value for m in QuantizationMode][:6] == ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4"]


# -- Quick start --------------------------------------------------------------------------------
def test_quick_start(caplog):
    from sli.quantization import LayerQuantizer, QuantizationConfig, QuantizationMode

    torch.manual_seed(0)
    # 1. Create a sample layer
    layer = nn.Linear(1024, 4096)
    # 2. Configure quantization (4-bit NF4)
    config = QuantizationConfig(mode=QuantizationMode.NF4)
    # 3. Create quantizer and quantize
    quantizer = LayerQuantizer(config)
    quantized_layer = quantizer.quantize_layer(layer)
    # 4. Check size reduction
    original_size = layer.weight.numel() * layer.weight.element_size()
    ratio = quantizer.get_quantized_size_ratio(quantized_layer)
    assert f"Size reduced to {ratio*100:.0f}% of original" == "Size reduced to 26% of original"  # the document: ~25%
    assert 0.24 < ratio < 0.27 and original_size == 1024 * 4096 * 4
    # 5. Dequantize when needed
    full_precision_layer = quantizer.dequantize_layer(quantized_layer)
    assert isinstance(full_precision_layer, nn.Linear) and full_precision_layer.weight.dtype == torch.float16  # compute dtype
    # a quantized module, computing: its output is the dequantized weights' output, and near the float layer's
    x = torch.randn(8, 1024)
    with torch.no_grad():
        got = quantized_layer(x)
        assert got.dtype == x.dtype
        assert _rel(got, full_precision_layer(x.half())) < 1e-3
        assert _rel(got, layer(x)) < OUTPUT_ERROR_BOUND["nf4"]


@pytest.mark.parametrize("mode, ratio", [("nf4", 0.25), ("fp4", 0.25), ("int8", 0.5), ("int8_dynamic", 0.5), ("int4", 0.28)])
def test_every_mode_on_a_plain_linear(mode, ratio):
    from sli.quantization import LayerQuantizer, QuantizationConfig

    torch.manual_seed(1)
    layer = nn.Linear(1024, 4096)
    q = LayerQuantizer(QuantizationConfig(mode=mode))
    ql = q.quantize_layer(layer)
    assert q.is_quantized(ql) and not q.is_quantized(layer)
    assert abs(q.get_quantized_size_ratio(ql) - ratio) < 0.015, q.get_quantized_size_ratio(ql)
    w = q.dequantize_layer(ql, torch.float32).weight
    assert _rel(w, layer.weight) < OUTPUT_ERROR_BOUND[mode]
    x = torch.randn(4, 1024)
    with torch.no_grad():
        assert _rel(ql(x), layer(x)) < OUTPUT_ERROR_BOUND[mode]


@pytest.mark.parametrize("mode", ["nf4", "int8", "int4"])
def test_a_dtype_cast_leaves_the_encoding_alone(mode):
    from sli.quantization import quantize_layer

    torch.manual_seed(8)
    q = quantize_layer(nn.Linear(256, 128), mode=mode, compute_dtype=torch.float32)
    before = {n: p.clone() for n, p in q.named_parameters() if n != "bias"}
    x = torch.randn(2, 256)
    with torch.no_grad():
        want = q(x)
        q.half()
        assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in q.named_parameters() if n != "bias")
        got = q(x)
    assert q.compute_dtype is torch.float32 and _rel(got, want) < 1e-3  # only the bias went through fp16


def test_int4_in_bfloat16_computes_with_the_packed_kernel():
    from runtime.kernels import Int4CpuKernel
    from sli.quantization import quantize_layer

    if not Int4CpuKernel.available():
        pytest.skip("this torch has no CPU int4 kernel")
    torch.manual_seed(2)
    layer = nn.Linear(512, 256)
    q = quantize_layer(layer, mode="int4", compute_dtype=torch.bfloat16, group_size=64)
    x = torch.randn(3, 512)
    with torch.no_grad():
        got = q(x)
        ref = nn.functional.linear(x.bfloat16().float(), q.dequantized_weight(torch.float32), q.bias.float())
    assert q._packed is not None  # the kernel's layout was derived and used
    assert _rel(got, ref) < 0.02


def test_predefined_configs():
    from sli.quantization import (
        AdaptiveQuantizer,
        QuantizationMode,
        get_fp4_config,
        get_int8_config,
        get_mixed_precision_config,
        get_nf4_config,
    )

    int8_config = get_int8_config()
    nf4_config = get_nf4_config()
    fp4_config = get_fp4_config()
    mixed_quantizer = get_mixed_precision_config()
    assert int8_config.mode is QuantizationMode.INT8 and int8_config.llm_int8_skip_modules == ["lm_head", "embed_tokens"]
    assert nf4_config.mode is QuantizationMode.NF4 and nf4_config.double_quant
    assert fp4_config.mode is QuantizationMode.FP4
    assert isinstance(mixed_quantizer, AdaptiveQuantizer)
    assert mixed_quantizer.config_for("model.layers.0.self_attn.q_proj").mode is QuantizationMode.INT8
    assert mixed_quantizer.config_for("model.layers.0.mlp.up_proj").mode is QuantizationMode.NF4


def test_convenience_functions():
    from sli.quantization import dequantize_layer, quantize_layer

    torch.manual_seed(3)
    layer = nn.Linear(256, 512)
    quantized = quantize_layer(layer, mode="nf4")
    restored = dequantize_layer(quantized, compute_dtype=torch.float16)
    assert isinstance(restored, nn.Linear) and restored.weight.dtype == torch.float16
    assert _rel(restored.weight, layer.weight) < OUTPUT_ERROR_BOUND["nf4"]
    quantized = quantize_layer(layer, mode="nf4", compute_dtype=torch.bfloat16)
    assert quantized.compute_dtype is torch.bfloat16
    with torch.no_grad():
        assert quantized(torch.randn(2, 256)).dtype == torch.float32  # computes in bf16, answers in the input's dtype
    assert type(quantize_layer(layer)).__name__ == "QuantizedLinear" and quantize_layer(layer).codec == "int8_outlier"  # default int8


def test_serialization():
    from sli.quantization import QuantizationConfig, QuantizationMode

    config = QuantizationConfig(mode=QuantizationMode.INT8, compute_dtype=torch.float16)
    data = config.to_dict()
    assert data["mode"] == "int8" and data["compute_dtype"] == "torch.float16"
    restored = QuantizationConfig.from_dict(data)
    assert restored == config
    assert QuantizationConfig.from_dict(json.loads(json.dumps(data))) == config  # through JSON too
    bare = QuantizationConfig(mode=QuantizationMode.INT8).to_dict()
    assert bare["mode"] == "int8" and bare["compute_dtype"] is None  # unset: the processor's dtype applies


def test_layer_quantizer_methods_and_skips():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from sli.quantization import LayerQuantizer, QuantizationConfig, QuantizationMode

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    attention_layer = LlamaAttention(cfg, layer_idx=0)
    config = QuantizationConfig(mode=QuantizationMode.INT8, llm_int8_skip_modules=["o_proj"])
    quantizer = LayerQuantizer(config)
    before = attention_layer.o_proj
    quantized_attn = quantizer.quantize_layer(attention_layer, "model.layers.0.self_attn")
    assert quantized_attn is attention_layer and quantizer.is_quantized(quantized_attn)
    assert quantized_attn.o_proj is before  # skipped by name: left as it was
    assert type(quantized_attn.q_proj).__name__ == "QuantizedLinear"
    full_precision = quantizer.dequantize_layer(quantized_attn)
    assert not quantizer.is_quantized(full_precision) and isinstance(full_precision.q_proj, nn.Linear)
    # a whole-name skip keeps the layer itself; by default (skip list None) the head is int8 rows
    kept = QuantizationConfig(mode="nf4", llm_int8_skip_modules=["lm_head"])
    assert LayerQuantizer(kept).quantize_layer(nn.Linear(8, 8), "lm_head").__class__ is nn.Linear
    head = LayerQuantizer(QuantizationConfig(mode="nf4")).quantize_layer(nn.Linear(8, 8), "lm_head")
    assert type(head).__name__ == "QuantizedLinear" and head.codec == "int8_channel"


def test_adaptive_quantization_on_a_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from sli.quantization import AdaptiveQuantizer, QuantizationConfig, QuantizationMode

    path = make_tiny_model(tmp_path, "llama", layers=2, seed=11)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 9, 3, 77, 12]])
    with torch.no_grad():
        ref = model(ids).logits
    base_config = QuantizationConfig(mode=QuantizationMode.NF4)
    attention_config = QuantizationConfig(mode=QuantizationMode.INT8)
    adaptive = AdaptiveQuantizer(base_config=base_config, attention_config=attention_config, ffn_config=base_config)
    quantized_model = adaptive.quantize_model(model)
    assert quantized_model is model
    layer = quantized_model.model.layers[0]
    assert layer.self_attn.q_proj.codec == "int8_outlier" and layer.mlp.down_proj.codec == "nf4"
    assert quantized_model.lm_head.codec == "int8_channel"  # the head as int8 rows (the default skip list is None)
    with torch.no_grad():
        got = quantized_model(ids).logits
    # the reference: transformers running the dequantized weights
    deq = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, m in quantized_model.named_modules():
        if type(m).__name__ == "QuantizedLinear":
            deq.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float16).float())
    with torch.no_grad():
        assert (got - deq(ids).logits).abs().max() < 2e-2  # fp16 compute against fp32
    assert _rel(got, ref) < 0.2
    out = quantized_model.generate(ids, max_new_tokens=5, do_sample=False)  # transformers' own generate
    assert out.shape == (1, ids.shape[1] + 5)


def test_testing_retention_example(tmp_path):
    """The document's retention example: ``AdaptiveQuantizer(get_mixed_precision_config())``."""
    from transformers import AutoModelForCausalLM

    from sli.quantization import AdaptiveQuantizer, get_mixed_precision_config

    path = make_tiny_model(tmp_path, "qwen2", layers=2, seed=12)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantizer = AdaptiveQuantizer(get_mixed_precision_config())
    assert quantizer.to_dict() == get_mixed_precision_config().to_dict()
    quantized_model = quantizer.quantize_model(model)
    assert quantized_model.model.layers[1].mlp.up_proj.codec == "nf4"
    with pytest.raises(ValueError, match="ambiguous"):
        AdaptiveQuantizer(get_mixed_precision_config(), ffn_config=get_mixed_precision_config().base_config)


def test_registry_example():
    from sli.quantization import QuantizationConfig, QuantizationRegistry

    custom_config = QuantizationConfig(mode="int8", llm_int8_threshold=8.0)
    QuantizationRegistry.register("my_custom_int8", custom_config)
    config = QuantizationRegistry.get("my_custom_int8")
    assert config == custom_config and config is not custom_config
    available = QuantizationRegistry.list_configs()
    assert available == ["int8", "nf4", "fp4", "my_custom_int8"]


def test_best_practices_configs():
    from cache.codecs import CodecName
    from sli.quantization import (
        QuantizationConfig,
        QuantizationMode,
        get_int8_config,
        get_mixed_precision_config,
        get_nf4_config,
    )

    high_quality = get_int8_config()
    balanced = get_mixed_precision_config()
    maximum_compression = get_nf4_config()
    cpu_inference = QuantizationConfig(mode=QuantizationMode.INT8_DYNAMIC)
    w = torch.zeros(8, 8)
    assert high_quality.choose("model.layers.0.mlp.up_proj.weight", w).codec is CodecName.INT8_OUTLIER
    assert balanced.choose("model.layers.0.mlp.up_proj.weight", w).codec is CodecName.NF4
    assert maximum_compression.choose("model.layers.0.mlp.up_proj.weight", w).codec is CodecName.NF4
    assert cpu_inference.choose("model.layers.0.mlp.up_proj.weight", w).codec is CodecName.INT8_CHANNEL
    config = QuantizationConfig(mode=QuantizationMode.INT8, llm_int8_skip_modules=["lm_head", "embed_tokens", "norm", "gate"])
    assert config.choose("lm_head.weight", w).codec is CodecName.RAW
    assert config.choose("model.layers.0.block_sparse_moe.gate.weight", w).codec is CodecName.RAW
    assert config.choose("model.layers.0.mlp.gate_proj.weight", w).codec is CodecName.INT8_OUTLIER  # names, not substrings


# -- Troubleshooting and debugging --------------------------------------------------------------
def test_missing_bitsandbytes_is_a_clear_import_error():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # as if it were not installed
        import torch.nn as nn
        from sli.quantization import BITSANDBYTES_AVAILABLE, quantize_layer
        assert BITSANDBYTES_AVAILABLE is False
        assert type(quantize_layer(nn.Linear(64, 64), mode="int4")).__name__ == "QuantizedLinear"  # no bitsandbytes needed
        for mode in ("int8", "nf4", "fp4"):
            try:
                quantize_layer(nn.Linear(64, 64), mode=mode)
            except ImportError as e:
                print(e)
            else:
                raise SystemExit(mode + " quantized without bitsandbytes")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("bitsandbytes is required for int8 quantization")
    assert all("pip install 'bitsandbytes>=0.41.0'" in line for line in lines) and len(lines) == 3


def test_troubleshooting_snippets(tmp_path, monkeypatch):
    from sli.layer_cache import LayerCache
    from sli.quantization import BITSANDBYTES_AVAILABLE, LayerQuantizer, QuantizationConfig, get_nf4_config

    # quantize on CPU first, then move (the document moves to 'cuda'; the same call)
    layer = nn.Linear(1024, 4096)
    quantizer = LayerQuantizer(get_nf4_config())
    layer = layer.cpu()
    quantized = quantizer.quantize_layer(layer)
    quantized = quantized.to("cpu")
    # the compute dtype fix
    config = QuantizationConfig(compute_dtype=torch.float16)
    quantizer = LayerQuantizer(config)
    assert quantizer.config.compute_dtype is torch.float16
    # settings changed after construction take effect
    config = QuantizationConfig(mode="int8")
    config.llm_int8_skip_modules = ["lm_head", "embed_tokens", "self_attn"]
    config.llm_int8_threshold = 8.0
    assert config.codec_choice().params["threshold"] == 8.0
    assert LayerQuantizer(config).quantize_layer(nn.Linear(8, 8), "model.layers.0.self_attn.q_proj").__class__ is nn.Linear
    config.compress_statistics = True
    monkeypatch.setenv("SLI_HOME", str(tmp_path))
    cache = LayerCache(max_memory_cache_size_gb=4.0)
    assert cache.cache_dir == tmp_path / "layer-cache" and cache.max_memory_bytes == 4 << 30
    cache.close()
    # debugging: the isinstance check runs; sli's own check is is_quantized
    assert BITSANDBYTES_AVAILABLE
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    assert not isinstance(quantized, (Linear8bitLt, Linear4bit)) and LayerQuantizer.is_quantized(quantized)
    assert f"Mode: {quantizer.config.mode}" and f"Compute dtype: {quantizer.config.compute_dtype}" == "Compute dtype: torch.float16"

    def get_layer_size_mb(layer):
        total = 0
        for param in layer.parameters():
            total += param.numel() * param.element_size()
        return total / 1024 / 1024

    original_size = get_layer_size_mb(layer)
    quantized_size = get_layer_size_mb(quantized)
    assert 6.0 < original_size / quantized_size < 8.0  # fp32 to 4.1 bits plus a 16-bit bias
    logging.getLogger("sli.quantization").setLevel(logging.DEBUG)


# -- LayerCache ---------------------------------------------------------------------------------
def test_layer_cache_example_round_trips(tmp_path):
    from sli.layer_cache import LayerCache
    from sli.quantization import LayerQuantizer, get_nf4_config

    torch.manual_seed(4)
    layer = nn.Linear(1024, 4096)
    cache = LayerCache(cache_dir=tmp_path / "quantized_cache", max_cache_size_gb=50.0)
    config = get_nf4_config()
    quantizer = LayerQuantizer(config)
    quantized_layer = quantizer.quantize_layer(layer)
    cache.cache_layer(model_id="meta-llama/Llama-2-7b", layer_index=0, layer=quantized_layer, quantization_mode="nf4")
    cache.clear_memory()
    got = cache.get_layer("meta-llama/Llama-2-7b", 0)
    assert got is not quantized_layer and type(got).__name__ == "QuantizedLinear"
    for (n, a), (m, b) in zip(got.named_parameters(), quantized_layer.named_parameters(), strict=True):
        assert n == m and torch.equal(a, b), n
    x = torch.randn(3, 1024)
    with torch.no_grad():
        assert torch.equal(got(x), quantized_layer(x))
    assert cache.get_layer("meta-llama/Llama-2-7b", 1) is None
    with pytest.raises(ValueError, match="holds codecs"):
        cache.cache_layer("m", 0, quantized_layer, quantization_mode="int8")
    cache.close()


def test_layer_cache_rebuilds_a_transformers_decoder_layer(tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from sli.layer_cache import LayerCache, UnsupportedLayerError
    from sli.quantization import QuantizationConfig, quantize_layer

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    cfg._attn_implementation = "eager"
    layer = quantize_layer(LlamaDecoderLayer(cfg, layer_idx=1).eval(), QuantizationConfig(mode="int4", group_size=32))
    with LayerCache(cache_dir=tmp_path) as cache:
        cache.cache_layer("tiny", 1, layer, "int4")
        cache.clear_memory()
        got = cache.get_layer("tiny", 1)
        assert type(got) is LlamaDecoderLayer and got.mlp.up_proj.codec == "int4_group"
        h = torch.randn(1, 5, 64)
        pe = LlamaRotaryEmbedding(cfg)(h, torch.arange(5)[None])
        with torch.no_grad():
            a, b = layer(h, position_embeddings=pe, attention_mask=None), got(h, position_embeddings=pe, attention_mask=None)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert torch.equal(a, b)
        with pytest.raises(UnsupportedLayerError, match="without pickle"):
            cache.cache_layer("tiny", 2, nn.Bilinear(4, 4, 4))
        assert not cache.has_layer("tiny", 2)  # nothing half stored


@pytest.mark.parametrize("named", [
    "transformers.trainer.Trainer",  # not a modeling module (and never imported: checked first)
    "transformers.utils.hub.cached_file",
    "transformers.models.llama.modeling_llama.apply_rotary_pos_emb",  # a function, not a module class
    "transformers.models.llama.modeling_llama.nn",  # a module re-exported there
    "transformers.models.llama.modeling_llama.LlamaRMSNorm.__init__",  # an attribute path
    "transformers.models.llama.modeling_llama.GradientCheckpointingLayer",  # defined elsewhere, imported there
    "os.system",
])
def test_layer_cache_refuses_a_crafted_class(tmp_path, named):
    """A cache handed over is data, not code: the class a cached layer names must be an
    nn.Module defined in a transformers modeling module, else nothing is built."""
    import json
    import sys

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sli.layer_cache import LayerCache, UnsupportedLayerError

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    with LayerCache(cache_dir=tmp_path) as cache:
        cache.cache_layer("m", 0, LlamaMLP(cfg))
        vid = cache._vid("m")
        entry = cache.store.get_group(vid, "layer.0")
        assert entry.extra["module"]["class"] == "transformers.models.llama.modeling_llama.LlamaMLP"
        entry.extra["module"]["class"] = named  # what a crafted cache would say
        cache.store._write({(cache.store._meta, f"variant/{vid}/group/layer.0".encode()): json.dumps(entry.to_dict()).encode()})
        cache.clear_memory()
        sys.modules.pop("transformers.trainer", None)
        with pytest.raises(UnsupportedLayerError, match="a cache is data, not code"):
            cache.get_layer("m", 0)
        assert "transformers.trainer" not in sys.modules


def test_layer_cache_keeps_its_size_and_evicts_least_recently_used(tmp_path, caplog):
    from sli.layer_cache import LayerCache
    from sli.quantization import quantize_layer

    layers = [quantize_layer(nn.Linear(1024, 1024), mode="int8_dynamic") for _ in range(4)]  # ~1.05 MB stored each
    with LayerCache(cache_dir=tmp_path, max_cache_size_gb=3.5e6 / (1 << 30), max_memory_cache_size_gb=0) as cache:
        for i in range(3):
            cache.cache_layer("m", i, layers[i], "int8_dynamic")
        time.sleep(0.01)
        cache.get_layer("m", 0)  # layer 0 is now more recent than layer 1
        with caplog.at_level(logging.INFO, logger="sli.layer_cache"):
            cache.cache_layer("m", 3, layers[3], "int8_dynamic")
        assert [cache.has_layer("m", i) for i in range(4)] == [True, False, True, True]
        assert "evicted layer 1 of m" in caplog.text
        assert cache.size_bytes() <= cache.max_cache_bytes
        with pytest.raises(ValueError, match="more than max_cache_size_gb"):
            cache.cache_layer("m", 9, quantize_layer(nn.Linear(4096, 4096), mode="int8_dynamic"))
    assert (tmp_path / "data.mdb").stat().st_size < 3 * cache.max_cache_bytes  # freed pages are reused


def test_layer_cache_memory_lru(tmp_path):
    from sli.layer_cache import LayerCache
    from sli.quantization import quantize_layer

    with LayerCache(cache_dir=tmp_path, max_memory_cache_size_gb=1.5e6 / (1 << 30)) as cache:
        for i in range(2):
            cache.cache_layer("m", i, quantize_layer(nn.Linear(1024, 1024), mode="int8_dynamic"))
        a = cache.get_layer("m", 0)
        assert cache.get_layer("m", 0) is a  # from memory
        cache.get_layer("m", 1)  # 1.05 MB more: layer 0 leaves the memory LRU
        assert cache.get_layer("m", 0) is not a


def test_layer_cache_corrupt_record_raises(tmp_path):
    import lmdb

    from sli.layer_cache import LayerCache
    from sli.quantization import quantize_layer

    with LayerCache(cache_dir=tmp_path, max_memory_cache_size_gb=0) as cache:
        cache.cache_layer("m", 0, quantize_layer(nn.Linear(256, 256), mode="int4"))
        vid = cache._vid("m")
    env = lmdb.open(str(tmp_path), max_dbs=4)
    db = env.open_db(b"tensors")
    with env.begin(write=True, db=db) as txn:
        key = f"{vid}/0.weight".encode()
        rec = bytearray(txn.get(key))
        rec[-10] ^= 0xFF
        txn.put(key, bytes(rec))
    env.close()
    with LayerCache(cache_dir=tmp_path, max_memory_cache_size_gb=0) as cache:
        with pytest.raises(CorruptRecordError):
            cache.get_layer("m", 0)


def test_layer_cache_several_processes_at_once(tmp_path):
    from sli.layer_cache import LayerCache
    from sli.quantization import quantize_layer

    torch.manual_seed(6)
    with LayerCache(cache_dir=tmp_path) as cache:
        for i in range(4):
            cache.cache_layer("m", i, quantize_layer(nn.Linear(512, 512), mode="nf4", compute_dtype=torch.float32))
        x = torch.randn(2, 512, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            want = [cache.get_layer("m", i)(x).sum().item() for i in range(4)]
    code = textwrap.dedent(
        f"""
        import sys, torch, torch.nn as nn
        from sli.layer_cache import LayerCache
        from sli.quantization import quantize_layer
        x = torch.randn(2, 512, generator=torch.Generator().manual_seed(7))
        with LayerCache(cache_dir={str(tmp_path)!r}, max_memory_cache_size_gb=0) as cache:
            writer = sys.argv[1] == "w"
            for rep in range(5):
                for i in range(4):
                    if writer:
                        cache.cache_layer("other", i, quantize_layer(nn.Linear(256, 256), mode="int4"))
                    else:
                        with torch.no_grad():
                            print(cache.get_layer("m", i)(x).sum().item())
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, role], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for role in ("r", "r", "w")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs if 'Error' in o[1]]
    for out, _ in outs[:2]:
        assert [float(v) for v in out.split()] == want * 5


def test_benchmarking_example(tmp_path):
    """The document's loading benchmark, on tiny layers: it runs and gives a ratio."""
    from sli.layer_cache import LayerCache
    from sli.quantization import quantize_layer

    def benchmark_loading(cache, model_id, num_layers=10):
        times = []
        for i in range(num_layers):
            start = time.time()
            layer = cache.get_layer(model_id, i)
            times.append(time.time() - start)
            assert layer is not None
        return sum(times) / len(times)

    quantized_cache = LayerCache(cache_dir=tmp_path / "quantized", max_memory_cache_size_gb=0)
    regular_cache = LayerCache(cache_dir=tmp_path / "regular", max_memory_cache_size_gb=0)
    for i in range(10):
        layer = nn.Linear(256, 256).half()
        regular_cache.cache_layer("model", i, layer, "none")
        quantized_cache.cache_layer("model", i, quantize_layer(layer, mode="nf4"), "nf4")
    quantized_time = benchmark_loading(quantized_cache, "model")
    regular_time = benchmark_loading(regular_cache, "model")
    assert regular_time / quantized_time > 0
    assert quantized_cache.size_bytes() < 0.4 * regular_cache.size_bytes()
    quantized_cache.close()
    regular_cache.close()


# -- the processor example and the compute-dtype rule -------------------------------------------
def test_processor_example_and_dtype_rule(tiny_llama, tmp_path):
    from cache.errors import VariantNotFoundError
    from sli.offline.sources import ModelSourceError
    from sli.processor import UniversalSLIProcessor
    from sli.quantization import QuantizationConfig, get_int8_config

    # the document's example names a hub model; sli reads local files, and says so at once
    with pytest.raises(ModelSourceError, match="local files only"):
        UniversalSLIProcessor(model_name="meta-llama/Llama-2-7b", quantization_config=get_int8_config())

    processor = UniversalSLIProcessor(model_name=tiny_llama, quantization_config=get_int8_config(), cache_dir=tmp_path, progress=False)
    with pytest.raises(VariantNotFoundError, match="call processor.load"):
        processor.model  # reading a property never quantizes
    assert not (tmp_path / "data.mdb").exists()
    assert processor.dtype is torch.float32
    processor.load()
    assert processor.model.manifest.quantization["mode"] == "int8"
    processor.close()
    bf16 = UniversalSLIProcessor(tiny_llama, quantization_config=QuantizationConfig(mode="int8", compute_dtype=torch.bfloat16,
                                                                                   llm_int8_skip_modules=["lm_head", "embed_tokens"]),
                                 cache_dir=tmp_path, progress=False)
    assert bf16.dtype is torch.bfloat16 and bf16.variant_id == processor.variant_id  # one cache for every compute dtype
    assert bf16.load().dtype is torch.bfloat16
    bf16.close()
    with pytest.raises(ValueError, match="contradicts"):
        UniversalSLIProcessor(tiny_llama, quantization_config=QuantizationConfig(mode="int8", compute_dtype=torch.bfloat16,
                                                                                   llm_int8_skip_modules=["lm_head", "embed_tokens"]),
                              dtype="float32", cache_dir=tmp_path)
    auto = UniversalSLIProcessor(tiny_llama, quantization_config="int8", dtype="auto", cache_dir=tmp_path, progress=False)
    assert auto.dtype is auto.source.read("model.layers.0.mlp.up_proj.weight").dtype
    auto.close()
