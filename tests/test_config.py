"""Layer 1: quantization config, presets, registry, mixed precision, skip lists."""

import pytest
import torch

from cache.codecs import CodecName
from sli import (
    AdaptiveQuantizer,
    QuantizationConfig,
    QuantizationMode,
    QuantizationRegistry,
    default_registry,
    get_fp4_config,
    get_int8_config,
    get_mixed_precision_config,
    get_nf4_config,
)
from sli.config import module_matches, plan_from_dict

W = torch.zeros(8, 8)


def test_defaults_and_derived_fields():
    c = QuantizationConfig()
    assert c.mode is QuantizationMode.NF4 and c.quant_type == "nf4" and c.compress_statistics is True
    assert QuantizationConfig(mode="int4").quant_type is None
    assert get_fp4_config().quant_type == "fp4"
    assert get_int8_config().mode is QuantizationMode.INT8
    assert get_nf4_config(double_quant=False).compress_statistics is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "int3"}, "unknown quantization mode 'int3'"),
        ({"compute_dtype": "float8"}, "compute_dtype must be"),
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
    c = QuantizationConfig(mode="int4", group_size=64, llm_int8_skip_modules=["lm_head"])
    assert QuantizationConfig.from_dict(c.to_dict()) == c
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
    assert c.choose("lm_head.weight", W).codec is CodecName.RAW
    assert c.choose("model.embed_tokens.weight", W).codec is CodecName.RAW
    assert QuantizationConfig(mode="int8", llm_int8_skip_modules=[]).choose("lm_head.weight", W).codec is CodecName.INT8_OUTLIER
    assert QuantizationConfig(mode="none").choose("model.layers.0.mlp.up_proj.weight", W).codec is CodecName.RAW


def test_adaptive_attention_int8_ffn_nf4():
    a = AdaptiveQuantizer()
    assert a.choose("model.layers.0.self_attn.k_proj.weight", W).codec is CodecName.INT8_OUTLIER
    assert a.choose("model.layers.0.mlp.down_proj.weight", W).codec is CodecName.NF4
    assert a.choose("model.layers.0.post_attention_layernorm.weight", torch.zeros(8)).codec is CodecName.RAW
    assert a.choose("lm_head.weight", W).codec is CodecName.RAW
    b = AdaptiveQuantizer(ffn=QuantizationConfig(mode="int4"), default=QuantizationConfig(mode="int8"), skip_modules=[])
    assert b.choose("model.layers.0.mlp.down_proj.weight", W).codec is CodecName.INT4_GROUP
    assert b.choose("lm_head.weight", W).codec is CodecName.INT8_OUTLIER
    assert a.fingerprint() != b.fingerprint()


def test_registry():
    reg = default_registry()
    assert set(reg.list_configs()) == {m.value for m in QuantizationMode} | {"mixed"}
    got = reg.get("nf4")
    got.group_size = 32  # a copy: the registry is unchanged
    assert reg.get("nf4").group_size == 64
    with pytest.raises(ValueError, match="already registered"):
        reg.register("nf4", QuantizationConfig())
    reg.register("nf4", QuantizationConfig(mode="fp4"), overwrite=True)
    assert reg.get("nf4").mode is QuantizationMode.FP4
    with pytest.raises(KeyError, match="no quantization config named 'q3'"):
        QuantizationRegistry().get("q3")
