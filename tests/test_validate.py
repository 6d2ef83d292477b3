"""Quality: perplexity against transformers, the validate gate and report, salience-driven plans."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from cache import LayerStore
from conftest import make_tiny_model
from runtime.evaluate import perplexity
from runtime.executor import StreamingModel
from sli import QuantizationConfig, UniversalSLIProcessor
from sli.offline.salience import plan_by_salience, weighted_error
from sli.validate import RETENTION_PROMPTS, default_text, describe_model, error_summary


def _hf_perplexity(model, ids, max_length, stride):
    """The usual transformers sliding-window recipe, written independently of sli's."""
    nll, count, prev_end = 0.0, 0, 0
    n = ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = model(window).logits
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        mask = shift_labels != -100
        nll += float(F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum"))
        count += int(mask.sum())
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


def test_perplexity_equals_transformers_reference(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    r = UniversalSLIProcessor(tiny_llama, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, progress=False).quantize()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(9))
    want, count = _hf_perplexity(ref, ids, max_length=64, stride=24)
    with LayerStore(tmp_path, readonly=True) as st:
        for budget in (1 << 40, None):
            m = StreamingModel(st, r.variant_id, memory_budget=budget or 1 << 40, context_tokens=64)
            if budget is None:  # the streamed path too
                m = StreamingModel(st, r.variant_id, memory_budget=m.minimum_bytes, context_tokens=64)
            got = perplexity(m, ids, max_length=64, stride=24)
            assert got.tokens_scored == count == 149
            assert got.perplexity == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, ids, max_length=64, stride=65)


def test_validate_gate_and_report(tmp_path, tiny_root, capsys):
    from sli.cli import main

    path = make_tiny_model(tiny_root, "llama", layers=2, seed=3)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 37}" for i in range(300)))
    report = tmp_path / "r.json"
    rc = main(["validate", str(path), "--mode", "int2", "--cache", str(tmp_path / "c"), "--text", str(text),
               "--max-accuracy-loss", "1000", "--report", str(report), "--max-length", "64"])
    d = json.loads(report.read_text())
    assert rc == 0 and d["passed"] is True and d["perplexity"] != d["reference_perplexity"]
    for key in ("reference_perplexity", "perplexity", "perplexity_delta_pct", "retention_exact_match", "retention_token_agreement",
                "bits_per_weight", "cache_bytes", "reduction_factor", "tensor_errors", "model_fingerprint", "quant_fingerprint"):
        assert key in d, key
    assert d["perplexity_delta_pct"] == pytest.approx(100 * (d["perplexity"] / d["reference_perplexity"] - 1))
    assert d["reduction_factor"] == pytest.approx(d["original_bytes"] / d["cache_bytes"])
    assert d["retention_prompts"] == len(RETENTION_PROMPTS) and 0 <= d["retention_token_agreement"] <= 1
    assert d["tensor_errors"]["quantized_tensors"] > 0
    rc = main(["validate", str(path), "--mode", "none", "--cache", str(tmp_path / "c"), "--text", str(text),
               "--max-accuracy-loss", "0.0001", "--max-length", "64"])
    assert rc == 0  # the reference against itself: delta 0
    capsys.readouterr()
    assert main(["validate", "--model-path", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama" and info["format"] == "safetensors" and info["parameters"] > 0
    assert main(["validate", "--model-path", str(tmp_path / "nothing")]) == 2


def test_default_text_ships_with_python():
    assert len(default_text()) > 100_000 and "assert" in default_text()
    assert error_summary({"a": {"codec": "raw", "rel_mse": 0, "max_abs_err": 0}}) == {"quantized_tensors": 0}


def test_weighted_error_weights_channels_by_their_inputs():
    w = torch.ones(4, 2)
    approx = w.clone()
    approx[:, 1] += 0.1  # error only in channel 1
    assert weighted_error(w, approx, torch.tensor([1.0, 0.0])) == 0.0
    assert weighted_error(w, approx, torch.tensor([0.0, 1.0])) == pytest.approx(0.01)


def test_salience_plan_meets_its_target_and_quantizes(tmp_path, tiny_root):
    from sli.offline.sources import open_source

    path = make_tiny_model(tiny_root, "llama", layers=2, seed=6)
    ref = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode="none"), cache_dir=tmp_path, progress=False)
    for target in (6.0, 7.0):  # bits per weight over every parameter: the embeddings (int8 rows) and norms count
        sp = plan_by_salience(open_source(path), ref.load(), ref.tokenizer, target_bits=target, progress=False)
        assert sp.achieved_bits <= target and sp.achieved_bits > target - 1.5 and sp.bits_all == sp.achieved_bits
        assert len(sp.choices) == 2 * 7 and set(sp.plan.overrides) == set(sp.choices)
    assert len(sp.counts()) >= 1
    with pytest.raises(ValueError, match=r"target of 1.0 bits per weight \(all \d+ parameters\) is below the .* raise --target-bits to at least"):
        plan_by_salience(open_source(path), ref.load(), ref.tokenizer, target_bits=1.0, progress=False)
    ref.close()  # a process reads or writes a cache, not both at once
    p = UniversalSLIProcessor(path, adaptive_quantizer=sp.plan, cache_dir=tmp_path, progress=False)
    r = p.quantize()
    # counted one way: the built cache's bits per weight (stored bytes over every parameter) is within the target
    assert r.bits_per_weight <= sp.achieved_bits + 1e-9 <= sp.target_bits + 1e-9
    assert r.bits_per_weight > sp.achieved_bits - 0.5  # zstd only trims what the plan counted
    assert r.tensor_errors["model.embed_tokens.weight"]["codec"] == "int8_channel"
    codecs = {e["codec"] for n, e in r.tensor_errors.items() if n in sp.choices}
    assert codecs <= {"int2_group", "nf4", "int4_group", "int8_channel"} and len(codecs) >= 1
    again = UniversalSLIProcessor(path, adaptive_quantizer=type(sp.plan).from_dict(sp.plan.to_dict()), cache_dir=tmp_path, progress=False)
    assert again.variant_id == p.variant_id  # overrides survive the manifest round trip


@pytest.mark.real
def test_validate_gate_fails_for_int2_on_the_real_model(real_model, tmp_path):
    from sli.cli import main

    report = tmp_path / "r.json"
    rc = main(["validate", str(real_model), "--mode", "int2", "--cache", str(tmp_path), "--max-tokens", "512",
               "--max-accuracy-loss", "5", "--report", str(report)])
    d = json.loads(report.read_text())
    assert rc == 1 and d["passed"] is False and d["perplexity_delta_pct"] > 5
    assert d["text"] == "pydoc_data topics" and d["tokens_scored"] == 511
    rc = main(["validate", str(real_model), "--mode", "int8", "--cache", str(tmp_path), "--max-tokens", "512",
               "--max-accuracy-loss", "5"])
    assert rc == 0
