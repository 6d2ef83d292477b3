"""Layer 2: model readers of every format on tiny random models, and the layer-by-layer
quantizer: round trips through the cache, resume after a kill, errors on bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from cache import LayerStore, decode_tensor
from conftest import TINY_TYPES, make_tiny_model
from runtime.arch import UnsupportedArchitectureError
from sli.offline.quantizer import TensorQuantizer
from sli import (
    LayerQuantizer,
    MemoryValidationError,
    ModelSourceError,
    QuantizationConfig,
    QuantizationMode,
    UniversalSLIProcessor,
    dequantize_layer,
    get_mixed_precision_config,
    open_source,
    quantize_layer,
)


def _state_dict(path):
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_every_architecture_quantizes_and_decodes(tmp_path, tiny_root, model_type):
    path = make_tiny_model(tiny_root, model_type)
    proc = UniversalSLIProcessor(path, quantization_config="nf4", cache_dir=tmp_path / "c", progress=False)
    report = proc.quantize(validate_memory=True)
    cfg = proc.source.config
    assert report.built_groups == cfg.num_hidden_layers + 2 and report.resumed_groups == 0
    assert report.stored_bytes < report.original_bytes and report.reduction_factor > 1
    ref = _state_dict(path)
    with LayerStore(tmp_path / "c", readonly=True) as st:
        m = st.require_manifest(report.variant_id)
        assert set(m.tensors()) == set(ref)  # every tensor stored once, under its own name
        for name, enc in st.iter_records(report.variant_id):
            out = decode_tensor(enc)
            assert out.shape == ref[name].shape and out.dtype == ref[name].dtype
            if enc.codec == "raw":
                assert torch.equal(out, ref[name])
            else:
                e = m.tensors()[name]
                assert 0 < e.rel_mse < 0.02  # random init weights at 4 bits


@pytest.mark.parametrize("fmt, shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1)])
def test_formats_read_identically(tiny_root, fmt, shards):
    base = make_tiny_model(tiny_root, "qwen2", seed=7)
    other = make_tiny_model(tiny_root, "qwen2", fmt=fmt, shards=shards, seed=7)
    a, b = open_source(base), open_source(other)
    assert sorted(a.tensor_names()) == sorted(b.tensor_names())
    for n in a.tensor_names():
        assert torch.equal(a.read(n), b.read(n)), n
    assert b.format == ("pytorch" if fmt == "bin" else "safetensors")


def test_bad_model_inputs_give_clear_errors(tmp_path, tiny_llama):
    with pytest.raises(ModelSourceError, match="no model at .*expected a folder with config.json"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json and no .gguf"):
        open_source(tmp_path / "empty")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="config.json is not valid JSON"):
        open_source(bad)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(ModelSourceError, match="no \\*.safetensors or \\*.bin weights"):
        open_source(noweights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelSourceError, match="not a readable safetensors file"):
        open_source(broken)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        open_source(tmp_path / "x.txt")


def test_unknown_architecture_is_named(tmp_path, tiny_llama):
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (odd / "config.json").write_text(json.dumps(cfg))
    (odd / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedArchitectureError, match="model type 'gpt2' is not in sli's architecture registry"):
        UniversalSLIProcessor(odd, cache_dir=tmp_path / "c", progress=False).quantize()


@pytest.mark.parametrize("mode", [m.value for m in QuantizationMode])
def test_every_mode_round_trips_through_the_cache(tmp_path, tiny_llama, mode):
    cfg = QuantizationConfig(mode=mode, group_size=32)
    report = UniversalSLIProcessor(tiny_llama, quantization_config=cfg, cache_dir=tmp_path / "c", progress=False).quantize()
    if mode == "none":
        assert report.stored_bytes <= report.original_bytes and report.mean_rel_mse == 0.0
        assert report.quantized_parameters == 0
    else:
        assert report.raw_bytes < report.original_bytes
        assert report.quantized_parameters > 0 and report.mean_rel_mse > 0
    with LayerStore(tmp_path / "c", readonly=True) as st:
        m = st.require_manifest(report.variant_id)
        assert m.quantization["mode"] == mode
        lq = TensorQuantizer(cfg)
        src = open_source(tiny_llama)
        for name, enc in st.iter_records(report.variant_id):
            # what the cache holds is exactly what the quantizer produces in memory
            fresh, _ = lq.quantize_tensor(name, src.read(name), measure=False)
            assert all(torch.equal(fresh.parts[k], enc.parts[k]) for k in fresh.parts)


def test_mixed_precision_variant(tmp_path, tiny_llama):
    p = UniversalSLIProcessor(tiny_llama, adaptive_quantizer=get_mixed_precision_config(), cache_dir=tmp_path / "c", progress=False)
    r = p.quantize()
    codecs = {n: e["codec"] for n, e in r.tensor_errors.items()}
    assert codecs["model.layers.0.self_attn.q_proj.weight"] == "int8_outlier"
    assert codecs["model.layers.0.mlp.gate_proj.weight"] == "nf4"
    assert codecs["lm_head.weight"] == "int8_channel" and codecs["model.norm.weight"] == "raw"  # vocabulary rows
    with pytest.raises(ValueError, match="not both"):
        UniversalSLIProcessor(tiny_llama, quantization_config="nf4", adaptive_quantizer=get_mixed_precision_config())


def test_variants_share_a_cache_and_rerun_is_free(tmp_path, tiny_llama, tiny_root):
    c = tmp_path / "c"
    r1 = UniversalSLIProcessor(tiny_llama, quantization_config="nf4", cache_dir=c, progress=False).quantize()
    r2 = UniversalSLIProcessor(tiny_llama, quantization_config="int8", cache_dir=c, progress=False).quantize()
    other = make_tiny_model(tiny_root, "llama", layers=3, seed=5)
    r3 = UniversalSLIProcessor(other, quantization_config="nf4", cache_dir=c, progress=False).quantize()
    assert len({r1.variant_id, r2.variant_id, r3.variant_id}) == 3
    again = UniversalSLIProcessor(tiny_llama, quantization_config="nf4", cache_dir=c, progress=False).quantize()
    assert again.built_groups == 0 and again.variant_id == r1.variant_id and again.stored_bytes == r1.stored_bytes
    with LayerStore(c, readonly=True) as st:
        assert sorted(st.list_variants()) == sorted([r1.variant_id, r2.variant_id, r3.variant_id])


def test_validate_memory_rejects_a_codec_that_grows(tmp_path, tiny_llama):
    # a threshold so low that every column is an outlier: int8 plus a bf16 copy of each weight
    cfg = QuantizationConfig(mode="int8", llm_int8_threshold=1e-9)
    p = UniversalSLIProcessor(tiny_llama, quantization_config=cfg, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(MemoryValidationError, match="int8_outlier takes .* bytes, not less than the original"):
        p.quantize(validate_memory=True)
    with LayerStore(tmp_path / "c", readonly=True) as st:
        assert st.get_group(p.variant_id, "layer.0") is None  # nothing of the failing group was written
    grown = p.quantize().codec_bytes["int8_outlier"]  # without the check it is built, and the report shows it
    assert grown["raw"] > grown["original"]


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from cache.store import GroupWriter
    model, cache, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = GroupWriter.finish
    calls = []
    def finish(self, entry):
        if len(calls) == after:  # the group's records are in the open transaction: die before commit
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, entry)
        calls.append(1)
    GroupWriter.finish = finish
    from sli import UniversalSLIProcessor
    UniversalSLIProcessor(model, quantization_config="nf4", cache_dir=cache, progress=False).quantize()
    """
)


def test_killed_quantization_resumes_to_the_same_result(tmp_path, tiny_root):
    model = make_tiny_model(tiny_root, "mistral", layers=4, seed=11)
    cache = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(model), str(cache), "3"], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    p = UniversalSLIProcessor(model, quantization_config="nf4", cache_dir=cache, progress=False)
    with LayerStore(cache, readonly=True) as st:
        assert st.list_variants() == []  # no manifest: unfinished
        assert [st.get_group(p.variant_id, g) is not None for g in ["embed", "layer.0", "layer.1", "layer.2"]] == [True, True, True, False]
    resumed = p.quantize()
    assert resumed.resumed_groups == 3 and resumed.built_groups == 4 + 2 - 3
    fresh = UniversalSLIProcessor(model, quantization_config="nf4", cache_dir=tmp_path / "fresh", progress=False).quantize()
    assert fresh.variant_id == resumed.variant_id and fresh.stored_bytes == resumed.stored_bytes
    with LayerStore(cache, readonly=True) as a, LayerStore(tmp_path / "fresh", readonly=True) as b:
        names = list(a.require_manifest(resumed.variant_id).tensors())
        assert names == list(b.require_manifest(fresh.variant_id).tensors())
        for n in names:
            assert a.raw_record(resumed.variant_id, n) == b.raw_record(fresh.variant_id, n), n


def test_layer_quantizer_api_on_a_module():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64, bias=False))
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = layer(x)
        q = quantize_layer(layer, mode="nf4", compute_dtype=torch.float32)  # in place: the linears are swapped
        assert q is layer and type(q[0]).__name__ == "QuantizedLinear" and isinstance(q[1], torch.nn.LayerNorm)
        assert LayerQuantizer.is_quantized(q) and q[0].codec == "nf4"
        # against the same layer in float32: 4.1 bits of 32 for the linears, the norm as it is
        assert 0.1 < LayerQuantizer.get_quantized_size_ratio(q) < 0.2
        rel = (q(x) - ref).pow(2).mean() / ref.pow(2).mean()
        assert 0 < rel < 0.05
        restored = dequantize_layer(q, compute_dtype=torch.float32)
        assert isinstance(restored[0], torch.nn.Linear) and not LayerQuantizer.is_quantized(restored)
        assert torch.equal(restored(x), q(x))
        assert not LayerQuantizer.is_quantized(quantize_layer(layer, mode="none"))