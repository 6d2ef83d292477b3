"""Layer 2: calibrated quantization inside the layer-by-layer writer, on tiny random models:
streamed logits equal transformers on the cache's dequantized weights, a killed build
resumes to the same bytes, activations spill to the cache directory, and the calibration is
part of what a variant is (fingerprint, inspect, a cache opened without restating it)."""

import json
import random

import pytest
import torch

from cache.store import LayerStore
from runtime.executor import StreamingModel
from sli.offline.calibration import CalibrationConfig, CalibrationMethod, read_text
from sli.offline.config import QuantizationConfig
from sli.offline.sources import open_source
from sli.offline.writer import quantize_model

from conftest import dequantized_reference, make_tiny_model


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """Text the tiny word-level tokenizer reads (``word0 .. wordN``)."""
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join(f"word{rng.randrange(300)}" for _ in range(3000)))
    return p


def _cal(text, method="gptq", **kw):
    return CalibrationConfig(method=method, text=str(text), samples=kw.pop("samples", 8), seqlen=kw.pop("seqlen", 32),
                             holdout_tokens=kw.pop("holdout_tokens", 64), awq_samples=4, awq_grid=5, **kw)


def _records(store, vid):
    return {n: bytes(store.env.begin(db=store._tensors).get(f"{vid}/{n}".encode())) for n in
            (t2 for g in store.require_manifest(vid).groups for t in g.tensors for t2 in t.record_names())}


@pytest.mark.parametrize("model_type,method,mode,gs,permute", [
    ("llama", "gptq", "int4", 16, "none"), ("qwen2", "awq", "int4", 32, "none"), ("gemma", "awq+gptq", "int3", 16, "none"),
    ("mistral", "gptq", "int8_dynamic", 64, "none"), ("llama", "gptq", "int4", 16, "activation"), ("qwen2", "awq", "int4", 16, "weight"),
    ("llama", "rtn", "int4", 16, "none"),
])
def test_calibrated_cache_streams_like_transformers_on_its_dequantized_weights(tmp_path, tiny_root, calib_text, model_type, method, mode, gs,
                                                                              permute):
    path = make_tiny_model(tiny_root, model_type, layers=2)
    # [] quantizes the head and embeddings too: the untied head then goes through GPTQ on the final norm's output
    plan = QuantizationConfig(mode=mode, group_size=gs, llm_int8_skip_modules=[], calibration=_cal(calib_text, method), permute=permute)
    with LayerStore(tmp_path / "c") as st:
        report = quantize_model(open_source(path), plan, st, progress=False)
        m = st.require_manifest(report.variant_id)
        layers = [g for g in m.groups if g.name.startswith("layer.")]
        assert all("next_inputs" in g.extra["calibration"] for g in layers)
        if CalibrationMethod(method).gptq:  # GPTQ's own measure: lower output error than round to nearest on the same grid
            errs = [e for g in layers for e in g.extra["calibration"]["gptq"].values()]
            assert sum(e[0] for e in errs) < sum(e[1] for e in errs)
        if method.startswith("awq"):
            assert all(len(g.extra["calibration"]["awq"]) >= 3 for g in layers)
        assert m.extra["calibration"]["method"] == method and not (tmp_path / "c" / "calibration").exists()  # files removed
        if permute != "none":  # channels reordered before grouping, the order stored with the record
            assert all(t.params.get("permuted") for g in layers for t in g.tensors if t.codec == "int4_group")
        ref = dequantized_reference(path, st, report.variant_id)
        sm = StreamingModel(st, report.variant_id, memory_budget=1 << 40, dtype=torch.float32)
        ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (sm.logits(ids) - ref(ids).logits).abs().max()
        sm.close()
    assert diff < 1e-4


def test_a_killed_calibration_resumes_to_the_same_bytes(tmp_path, tiny_root, calib_text, monkeypatch):
    from sli.offline import calibrate

    path = make_tiny_model(tiny_root, "llama", layers=3)
    plan = QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, "awq+gptq"))
    with LayerStore(tmp_path / "whole") as st:
        vid = quantize_model(open_source(path), plan, st, progress=False).variant_id
        whole = _records(st, vid)

    real = calibrate.CalibratedBuilder.calibrate_layer
    for lost_inputs in (False, True):
        cache = tmp_path / f"resumed-{lost_inputs}"

        def dies_at_layer_2(self, i, gname, x):
            if i == 2:
                raise KeyboardInterrupt("killed")
            return real(self, i, gname, x)

        monkeypatch.setattr(calibrate.CalibratedBuilder, "calibrate_layer", dies_at_layer_2)
        with LayerStore(cache) as st, pytest.raises(KeyboardInterrupt):
            quantize_model(open_source(path), plan, st, progress=False)
        monkeypatch.setattr(calibrate.CalibratedBuilder, "calibrate_layer", real)
        files = sorted(p.name for p in (cache / "calibration" / vid).iterdir())
        assert files == ["inputs-2.f32"]  # layer 1 committed with layer 2's inputs; layer 1's own were released
        if lost_inputs:  # then they are recomputed from the stored embeddings and layers
            (cache / "calibration" / vid / "inputs-2.f32").write_bytes(b"\0" * 16)
        with LayerStore(cache) as st:
            r = quantize_model(open_source(path), plan, st, progress=False)
            assert r.resumed_groups == 3 and r.built_groups == 2
            assert _records(st, vid) == whole


def test_activations_spill_to_the_cache_directory_over_the_budget(tmp_path, tiny_root, calib_text):
    path = make_tiny_model(tiny_root, "llama", layers=2)
    plan = QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text))
    out = {}
    for budget in (None, 1000):  # 1000 bytes: the 8 x 32 x 64 float32 buffers (64 KiB) spill
        with LayerStore(tmp_path / str(budget)) as st:
            vid = quantize_model(open_source(path), plan, st, progress=False, memory_budget=budget).variant_id
            assert st.require_manifest(vid).extra["calibration"]["spilled"] is (budget is not None)
            out[budget] = _records(st, vid)
    assert out[None] == out[1000]


def test_calibration_is_part_of_the_variant(tmp_path, tiny_root, calib_text):
    base = QuantizationConfig(mode="int4", group_size=16)
    fps = {
        "rtn": base.fingerprint(),
        "gptq": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text)).fingerprint(),
        "awq": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, "awq")).fingerprint(),
        "samples": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, samples=9)).fingerprint(),
        "seqlen": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, seqlen=16)).fingerprint(),
        "plain grids": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, importance=False)).fingerprint(),
        "rtn+importance": QuantizationConfig(mode="int4", group_size=16, calibration=_cal(calib_text, "rtn")).fingerprint(),
    }
    other = tmp_path / "other.txt"
    other.write_text(calib_text.read_text() + " word1")
    fps["text"] = QuantizationConfig(mode="int4", group_size=16, calibration=_cal(other)).fingerprint()
    assert len(set(fps.values())) == len(fps)
    # the same text under another path is the same calibration (the hash counts, not the path)
    same = tmp_path / "same.txt"
    same.write_text(calib_text.read_text())
    assert QuantizationConfig(mode="int4", group_size=16, calibration=_cal(same)).fingerprint() == fps["gptq"]
    # and a plan round-trips through the manifest's dict
    cfg = QuantizationConfig(mode="int4", group_size=16, symmetric=True, calibration=_cal(calib_text, act_order=True))
    assert QuantizationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_calibration_text_jsonl_and_bad_input(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "word1 word2"}) + "\n\n" + json.dumps({"text": "word3", "id": 7}) + "\n")
    assert read_text(j) == "word1 word2\n\nword3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: no 'text' string field"):
        read_text(bad)
    with pytest.raises(FileNotFoundError, match="--calibration-text"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unknown calibration method 'smoothquant'"):
        CalibrationConfig(method="smoothquant")


def test_the_default_text_is_shipped_and_never_the_validation_text():
    from pydoc_data.topics import topics

    from sli.offline.calibration import default_text_path

    text = read_text(None)
    assert default_text_path().is_file() and len(text) > 300_000
    assert (default_text_path().parent / "NOTICE").read_text().count("PSF") >= 1
    # no paragraph of the pydoc topics (what `sli validate` scores) is in it
    paragraphs = {p.strip() for t in topics.values() for p in t.split("\n\n") if len(p.strip()) > 200}
    assert not any(p in text for p in paragraphs)


def test_too_short_a_text_and_a_changed_text_are_errors(tmp_path, tiny_root, calib_text):
    from sli.offline.calibrate import source_tokenizer
    from sli.offline.calibration import calibration_set

    tok = source_tokenizer(open_source(make_tiny_model(tiny_root, "llama", layers=2)))
    with pytest.raises(ValueError, match=r"3000 tokens, fewer than the 3264 asked \(100 samples x 32 \+ 64 held out\)"):
        calibration_set(_cal(calib_text, samples=100), tok)
    p = tmp_path / "t.txt"
    p.write_text(calib_text.read_text())
    cfg = _cal(p)
    s = calibration_set(cfg, tok)
    assert s.samples.shape == (8, 32) and s.holdout.shape == (64,)
    p.write_text("word5 " * 3000)
    with pytest.raises(ValueError, match="the file changed"):
        calibration_set(cfg, tok)


def test_a_calibrated_int4_cache_runs_on_the_packed_kernel(tmp_path, tiny_root, calib_text):
    """GPTQ writes the same grid the packed int4 kernel reads: the bf16 streaming model runs the
    calibrated layers packed, and agrees with the float32 dequantizing path."""
    path = make_tiny_model(tiny_root, "llama", layers=2)
    plan = QuantizationConfig(mode="int4", group_size=32, calibration=_cal(calib_text))
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with LayerStore(tmp_path / "c") as st:
        vid = quantize_model(open_source(path), plan, st, progress=False).variant_id
    with LayerStore(tmp_path / "c", readonly=True) as st:
        packed = StreamingModel(st, vid, memory_budget=1 << 40, dtype=torch.bfloat16)
        assert len(packed.packed) == 2 * 7  # every projection of both layers
        a = packed.logits(ids)
        packed.close()
        exact = StreamingModel(st, vid, memory_budget=1 << 40, dtype=torch.float32)
        b = exact.logits(ids)
        exact.close()
    assert float((a - b).norm() / b.norm()) < 0.05  # bf16 activations and scales against float32
