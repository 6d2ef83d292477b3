"""Layer 1: quantization config, presets, registry, mixed precision, skip lists."""

import pytest
import torch

from cache.codecs import CodecName
from sli import (
    AdaptiveQuantizer,
    QuantizationConfig,
    QuantizationMode,
    QuantizationRegistry,
    get_fp4_config,
    get_int8_config,
    get_mixed_precision_config,
    get_nf4_config,
)
from sli.offline.adaptive import layer_type
from sli.offline.config import module_matches
from sli.offline.plans import plan_from_dict, resolve_plan, streaming_compute_dtype

W = torch.zeros(8, 8)


def test_defaults_and_derived_fields():
    c = QuantizationConfig()
    assert c.mode is QuantizationMode.NONE and c.quant_type is None and c.compress_statistics is True and c.double_quant is True
    assert c.compute_dtype is None and c.llm_int8_skip_modules is None and c.skip_modules == []
    assert c.vocab_mode is None
    assert QuantizationConfig(mode="nf4").quant_type == "nf4"
    assert QuantizationConfig(compute_dtype=torch.float16).compute_dtype is torch.float16
    assert QuantizationConfig(compute_dtype="torch.bfloat16").compute_dtype is torch.bfloat16
    assert QuantizationConfig(double_quant=False).compress_statistics is False
    assert QuantizationConfig(mode="int4").quant_type is None
    assert get_fp4_config().quant_type == "fp4"
    assert get_int8_config().mode is QuantizationMode.INT8
    assert get_nf4_config(double_quant=False).compress_statistics is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "int5"}, "unknown quantization mode 'int5'"),
        ({"mode": "int3", "group_size": 12}, "multiple of 8"),
        ({"mode": "int4", "permute": "random"}, "unknown permute 'random'"),
        ({"mode": "int4", "permute": "activation"}, "needs|give calibration"),
        ({"compute_dtype": "float8"}, "compute_dtype"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"double_quant": True, "compress_statistics": False}, "contradicts double_quant"),
        ({"mode": "nf4", "quant_type": "fp4"}, "does not fit mode"),
        ({"group_size": 30}, "multiple of 4"),
        ({"blocksize": 100}, "blocksize must be"),
        ({"llm_int8_threshold": -1}, ">= 0"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig(**kwargs)


def test_dict_round_trip_and_unknown_keys():
    c = QuantizationConfig(mode="int4", group_size=64, llm_int8_skip_modules=["lm_head"], compute_dtype=torch.bfloat16)
    assert c.to_dict()["compute_dtype"] == "torch.bfloat16" and c.to_dict()["quant_storage_dtype"] == "torch.uint8"
    assert QuantizationConfig.from_dict(c.to_dict()) == c
    # the compute dtype changes nothing stored, so one cache serves every compute dtype
    assert c.fingerprint() == QuantizationConfig(mode="int4", group_size=64, llm_int8_skip_modules=["lm_head"]).fingerprint()
    assert c.fingerprint() == QuantizationConfig.from_dict(c.to_dict()).fingerprint()
    assert c.fingerprint() != QuantizationConfig(mode="int4", group_size=128).fingerprint()
    with pytest.raises(ValueError, match=r"unknown QuantizationConfig keys \['bits'\]"):
        QuantizationConfig.from_dict({"mode": "nf4", "bits": 4})
    a = get_mixed_precision_config()
    assert plan_from_dict(a.to_dict()).to_dict() == a.to_dict()
    assert isinstance(plan_from_dict(c.to_dict()), QuantizationConfig)


def test_skip_matching_by_dotted_components():
    assert module_matches("lm_head", ["lm_head"])
    assert module_matches("model.embed_tokens", ["embed_tokens"])
    assert module_matches("model.layers.3.self_attn.q_proj", ["self_attn"])
    assert not module_matches("model.layers.3.self_attn.q_proj", ["attn"])
    assert not module_matches("model.lm_head_extra", ["lm_head"])


def test_choose_keeps_norms_biases_and_skipped():
    c = QuantizationConfig(mode="int8")
    assert c.choose("model.layers.0.mlp.up_proj.weight", W).codec is CodecName.INT8_OUTLIER
    assert c.choose("model.layers.0.input_layernorm.weight", torch.zeros(8)).codec is CodecName.RAW
    assert c.choose("model.layers.0.self_attn.q_proj.bias", torch.zeros(8)).codec is CodecName.RAW
    assert QuantizationConfig(mode="none").choose("model.layers.0.mlp.up_proj.weight", W).codec is CodecName.RAW


def test_vocab_rows_are_quantized_by_default_and_kept_when_skipped():
    """The head and the token embeddings: int8 rows (bf16 scales) in every quantized mode unless
    named in the skip list; int4 rows or 16 bits when vocab_mode says so; kept in mode none."""
    for mode in ("int8", "int8_dynamic", "nf4", "fp4", "int4", "int2"):
        c = QuantizationConfig(mode=mode)
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            got = c.choose(name, W)
            assert got.codec is CodecName.INT8_CHANNEL and got.params == {"scale_dtype": torch.bfloat16}, (mode, name)
    kept = QuantizationConfig(mode="nf4", llm_int8_skip_modules=["lm_head", "embed_tokens"])
    assert kept.choose("lm_head.weight", W).codec is CodecName.RAW and kept.choose("model.embed_tokens.weight", W).codec is CodecName.RAW
    assert QuantizationConfig(mode="none").choose("lm_head.weight", W).codec is CodecName.RAW
    four = QuantizationConfig(mode="nf4", vocab_mode="int4", group_size=32).choose("lm_head.weight", W)
    assert four.codec is CodecName.INT4_GROUP and four.params == {"group_size": 32}
    assert QuantizationConfig(mode="int4", vocab_mode="none").choose("lm_head.weight", W).codec is CodecName.RAW
    assert QuantizationConfig(mode="none", vocab_mode="int8").choose("lm_head.weight", W).codec is CodecName.INT8_CHANNEL
    with pytest.raises(ValueError, match="vocab_mode 'nf4' does not store rows that decode alone"):
        QuantizationConfig(mode="int4", vocab_mode="nf4")
    # the default spelled out and left unset are one plan; another vocab codec is another
    assert QuantizationConfig(mode="int4").fingerprint() == QuantizationConfig(mode="int4", vocab_mode="int8").fingerprint()
    assert QuantizationConfig(mode="int4").fingerprint() != QuantizationConfig(mode="int4", vocab_mode="int4").fingerprint()
    assert QuantizationConfig.from_dict(QuantizationConfig(mode="int4", vocab_mode="int4").to_dict()).vocab_mode is QuantizationMode.INT4


def test_adaptive_attention_int8_ffn_nf4():
    a = AdaptiveQuantizer()
    assert a.choose("model.layers.0.self_attn.k_proj.weight", W).codec is CodecName.INT8_OUTLIER
    assert a.choose("model.layers.0.mlp.down_proj.weight", W).codec is CodecName.NF4
    assert a.choose("model.layers.0.post_attention_layernorm.weight", torch.zeros(8)).codec is CodecName.RAW
    assert a.choose("lm_head.weight", W).codec is CodecName.INT8_CHANNEL  # the base config's vocab rows
    b = AdaptiveQuantizer(
        ffn_config=QuantizationConfig(mode="int4"), base_config=QuantizationConfig(mode="int8"), skip_modules=[]
    )
    assert b.choose("model.layers.0.mlp.down_proj.weight", W).codec is CodecName.INT4_GROUP
    assert b.choose("lm_head.weight", W).codec is CodecName.INT8_CHANNEL
    c = AdaptiveQuantizer(base_config=QuantizationConfig(mode="int8"), skip_modules=["lm_head"])
    assert c.choose("lm_head.weight", W).codec is CodecName.RAW
    assert a.fingerprint() != b.fingerprint()


@pytest.fixture
def registry():
    yield QuantizationRegistry
    QuantizationRegistry.reset()


def test_registry_is_class_level(registry):
    assert registry.list_configs() == ["int8", "nf4", "fp4"]
    got = registry.get("nf4")
    got.group_size = 32  # a copy: the registry is unchanged
    assert registry.get("nf4").group_size == 64
    with pytest.raises(ValueError, match="already registered"):
        registry.register("nf4", QuantizationConfig())
    registry.register("nf4", QuantizationConfig(mode="fp4"), overwrite=True)
    assert QuantizationRegistry.get("nf4").mode is QuantizationMode.FP4  # one registry for the process
    with pytest.raises(KeyError, match="no quantization config named 'q3'"):
        QuantizationRegistry.get("q3")
    with pytest.raises(TypeError, match="QuantizationConfig or an AdaptiveQuantizer"):
        registry.register("x", {"mode": "int8"})


def test_names_resolve_to_registered_then_modes_then_mixed(registry):
    registry.register("mine", QuantizationConfig(mode="int4", group_size=32))
    assert resolve_plan("mine").group_size == 32
    assert resolve_plan("int4").mode is QuantizationMode.INT4
    assert isinstance(resolve_plan("mixed"), AdaptiveQuantizer)
    with pytest.raises(KeyError, match="not registered"):
        resolve_plan("q3")


def test_precision_hierarchy_and_layer_typing():
    for base, attn in [("nf4", "int8"), ("fp4", "int8"), ("int4", "int8"), ("int8", "int8_dynamic"), ("int8_dynamic", "none")]:
        a = AdaptiveQuantizer(base_config=QuantizationConfig(mode=base))
        assert a.attention_config.mode.value == attn and a.ffn_config.mode.value == base, base
    assert layer_type("model.layers.0.self_attn.q_proj") == "attention"
    assert layer_type("transformer.h.0.attn.c_attn") == "attention"
    assert layer_type("encoder.layer.0.attention.self.query") == "attention"
    assert layer_type("model.layers.0.mlp.gate_proj") == "ffn"
    assert layer_type("transformer.h.0.fc1") == "ffn"
    assert layer_type("model.layers.0.block_sparse_moe.gate") == "other"


def test_one_compute_dtype_rule():
    src = torch.bfloat16
    unset = QuantizationConfig(mode="int8")
    assert streaming_compute_dtype(unset, None, src) is torch.float32  # nothing set: float32
    assert streaming_compute_dtype(unset, "bfloat16", src) is torch.bfloat16  # the processor's dtype
    assert streaming_compute_dtype(unset, "auto", src) is torch.bfloat16  # auto: the source's
    fp16 = QuantizationConfig(mode="int8", compute_dtype=torch.float16)
    assert streaming_compute_dtype(fp16, None, src) is torch.float16  # the config's, when the processor's is unset
    assert streaming_compute_dtype(fp16, "float16", src) is torch.float16
    assert streaming_compute_dtype(QuantizationConfig(compute_dtype="auto"), None, src) is torch.bfloat16
    with pytest.raises(ValueError, match="contradicts the quantization config's compute_dtype"):
        streaming_compute_dtype(fp16, "float32", src)
    mixed = AdaptiveQuantizer(attention_config=QuantizationConfig(mode="int8", compute_dtype=torch.float32),
                              compute_dtype=torch.bfloat16)
    assert mixed.compute_dtype_for("model.layers.0.mlp.up_proj.weight") is torch.bfloat16  # the adaptive default
    assert mixed.compute_dtype_for("model.layers.0.self_attn.q_proj.weight") is torch.float32  # the part overrides
    with pytest.raises(ValueError, match="several compute dtypes"):
        streaming_compute_dtype(mixed, None, src)
