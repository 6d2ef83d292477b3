"""The `sli` command line on a tiny model: quantize, inspect, errors with exit codes."""

import json

from sli.cli import main


def test_quantize_then_inspect(tmp_path, tiny_llama, capsys):
    cache = tmp_path / "c"
    assert main(["quantize", str(tiny_llama), "--mode", "int4", "--group-size", "32", "--cache", str(cache), "--validate-memory", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "int4" and report["reduction_factor"] > 1 and report["built_groups"] == 5
    assert main(["quantize", str(tiny_llama), "--mixed", "--skip", "", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "reduction_factor" in out and "built_groups" in out
    assert main(["inspect", str(cache), "--verify", "--tensors"]) == 0
    out = capsys.readouterr().out
    assert out.count("variant ") == 2 and "int4_group" in out and "int8_outlier" in out and "checksums ok" in out
    assert "layer.2" in out and "bits/weight" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), "--cache", str(tmp_path / "c")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nocache")]) == 2
    assert "no sli cache at" in capsys.readouterr().err


def test_calibrated_quantize_inspect_and_a_cache_that_opens_as_the_model(tmp_path, tiny_llama, capsys):
    """`sli quantize --calibrate`, `sli inspect` naming the method and text, and a cache directory
    holding one variant opened without restating how it was made (CLI and Python)."""
    import random

    from sli.processor import UniversalSLIProcessor

    rng = random.Random(0)
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": " ".join(f"word{rng.randrange(300)}" for _ in range(200))}) for _ in range(15)))
    cache = tmp_path / "c"
    args = ["quantize", str(tiny_llama), "--mode", "int4", "--group-size", "16", "--calibrate", "gptq", "--calibration-text",
            str(text), "--calibration-samples", "8", "--calibration-seqlen", "32", "--cache", str(cache), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "int4" and report["built_groups"] == 5
    assert main(["inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"calibration: gptq on {text}" in out and "8 x 32 tokens" in out and "sha256" in out and "peak" in out
    # the cache alone: no --mode, no --calibrate
    assert main(["generate", str(cache), "--prompt", "word1 word2", "--max-new-tokens", "3"]) == 0
    assert "word1 word2" in capsys.readouterr().out
    p = UniversalSLIProcessor(cache, progress=False)
    assert p.variant_id == report["variant_id"] and p.plan.calibration.method.value == "gptq"
    p.close()
    # a second variant: the cache must then be told which
    assert main(["quantize", str(tiny_llama), "--mode", "int8_dynamic", "--cache", str(cache)]) == 0
    capsys.readouterr()
    assert main(["generate", str(cache), "--prompt", "word1"]) == 2
    assert "holds 2 variants" in capsys.readouterr().err
    assert main(["generate", str(cache), "--mode", "int8_dynamic", "--prompt", "word1", "--max-new-tokens", "2"]) == 0
    # calibration options without --calibrate are an error, not ignored
    assert main(["quantize", str(tiny_llama), "--act-order", "--cache", str(cache)]) == 2
    assert "add --calibrate" in capsys.readouterr().err
