"""`sli bench --quality`: the goals are read off the run's own figures, and the whole run
works end to end on a tiny model (slow: every point in its own process)."""

import json

import pytest

from sli.bench_quality import QualityBenchConfig, specs
from sli.bench_quality_report import goals, markdown


def _row(system, method, bits, group, sym, ppl, **kw):
    return {"system": system, "method": method, "bits": bits, "group": group, "sym": sym, "perplexity": ppl, **kw}


def test_goals_are_checked_against_the_rows_of_the_run():
    rows = [
        {"system": "reference", "method": "fp32", "perplexity": 10.0},
        _row("sli", "rtn", 4, 64, False, 13.0, bits_all=5.9),
        _row("sli", "gptq", 4, 64, False, 11.0, bits_all=5.9),
        _row("sli", "awq+gptq", 4, 64, False, 10.9, bits_all=5.9),
        _row("llm-compressor", "gptq", 4, 64, False, 11.2, bits_all=5.8),
        _row("sli", "rtn", 3, 64, False, 25.0, bits_all=5.0),
        _row("sli", "gptq", 3, 64, False, 20.0, bits_all=5.0),
        _row("llm-compressor", "awq", 3, 64, False, 19.0, bits_all=4.9),
        {"system": "sli", "method": "target-loss", "target": 2.0, "perplexity": 10.15, "bits_all": 4.2, "planned_loss_pct": 1.8,
         "heldout_loss_pct": 1.7},
        _row("sli", "gptq", 4, 64, False, None, time_only=True, seconds=300.0, peak_rss_bytes=1.5 * 2**30, model="m1b", samples=8, seqlen=512),
        _row("llm-compressor", "gptq", 4, 64, False, None, time_only=True, seconds=200.0, peak_rss_bytes=6 * 2**30, model="m1b", samples=8, seqlen=512),
    ]
    text = "\n".join(goals(rows, 10.0))
    assert "int4 g64: sli's best calibrated is sli AWQ+GPTQ int4 g64 at +9.00%" in text
    assert "llm-compressor's best llm-compressor GPTQ int4 g64 at +12.00% (met: no worse)" in text
    assert "round to nearest +30.00% (met: at most half)" in text
    assert "int3 g64: sli's best calibrated is sli GPTQ int3 g64 at +100.00%; llm-compressor's best llm-compressor AWQ int3 g64 at +90.00% (NOT met" in text
    assert "round to nearest +150.00% (NOT met: at most half)" in text
    assert "`--target-loss 2`: +1.50% on the unseen text (met)" in text and "4.200 bits/weight" in text
    assert "1.50x its time (met: at most 3x)" in text and "peak 1.50 GiB (met: within 2 GiB)" in text
    md = markdown(rows, QualityBenchConfig(model="m"))
    assert "| sli AWQ+GPTQ int4 g64 |" in md and "+9.00" in md


def test_the_run_skips_groups_the_widths_do_not_allow(tiny_llama):
    cfg = QualityBenchConfig(model=str(tiny_llama), grid=("int4-g16", "int4-g128"), target_loss=None)
    ss = specs(cfg)
    g128 = [s for s in ss if s.get("group") == 128]
    assert g128 and all("not multiples of 128" in s["skip"] for s in g128)
    assert not any(s.get("skip") for s in ss if s.get("group") == 16)
    assert {s["system"] for s in ss} == {"reference", "sli", "llm-compressor", "bitsandbytes"}


@pytest.mark.slow
def test_bench_quality_end_to_end_on_a_tiny_model(tmp_path, tiny_llama):
    from sli.cli import main

    out = tmp_path / "out"
    assert main(["bench", str(tiny_llama), "--quality", "--out", str(out), "--workdir", str(tmp_path / "w"), "--grid", "int4-g16",
                 "--methods", "rtn,gptq,awq", "--quality-peers", "bnb-nf4", "--calibration-samples", "4", "--calibration-seqlen", "32",
                 "--eval-tokens", "128", "--bench-target-loss", "5", "--scale-model", "none"]) == 0
    data = json.loads((out / "quality.json").read_text())
    assert all(not r.get("error") for r in data["rows"]), [r.get("error") for r in data["rows"]]
    assert (out / "quality.png").stat().st_size > 0 and "Goals" in (out / "quality.md").read_text()
