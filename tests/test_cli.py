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
