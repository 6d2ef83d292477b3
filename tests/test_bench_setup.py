"""`sli bench` checks what its run needs before it starts: the plot's matplotlib and every
peer asked for; the default peers are those installed with sli's own dependencies."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sli.bench as bench
from sli.bench import DEFAULT_PEERS, BenchConfig, check_setup, run_bench

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **kw) -> BenchConfig:
    return BenchConfig(model="unused", cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "out"), plot=False, **kw)


def test_default_peers_come_with_sli_and_exclude_airllm(tmp_path):
    assert DEFAULT_PEERS == ("transformers", "transformers-bf16", "accelerate")
    check_setup(_cfg(tmp_path))  # installed with sli: nothing to say
    check_setup(_cfg(tmp_path, peers=()))


def test_a_peer_that_is_missing_or_unknown_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a point ran")

    monkeypatch.setattr(bench, "_run_point", never)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airllm" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"peer 'airllm' is not installed in .*AirLLM is not one of sli's dependencies.*"
                                          r"pip install -e '\.\[bench\]' airllm.*leave it out of --peers"):
        run_bench(_cfg(tmp_path, peers=("accelerate", "airllm")))
    with pytest.raises(ValueError, match="unknown peer.*llama; sli bench knows transformers, transformers-bf16, accelerate, airllm"):
        run_bench(_cfg(tmp_path, peers=("llama",)))
    assert not (tmp_path / "out").exists()


def _sli_bench(tmp_path, *args: str, hide: str | None = None) -> subprocess.CompletedProcess:
    """`sli bench` as a user runs it; ``hide``: a module made unimportable, as where it is not installed."""
    pre = f"import sys; sys.modules[{hide!r}] = None; " if hide else "import sys; "
    code = pre + "from sli.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "bench", "SmolLM2-135M-Instruct", "--cache", str(tmp_path / "c"),
                           "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.real
def test_sli_bench_without_matplotlib_fails_at_once_with_the_fix(tmp_path, real_model):
    t0 = time.perf_counter()
    r = _sli_bench(tmp_path, hide="matplotlib")  # before: eight minutes of points, then this error
    assert r.returncode == 2, r.stderr[-2000:]
    assert "matplotlib, which is not installed" in r.stderr and "pip install 'sli[bench]'" in r.stderr and "--no-plot" in r.stderr
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
    if importlib.util.find_spec("airllm") is not None:
        pytest.skip("AirLLM is installed here")
    r = _sli_bench(tmp_path, "--peers", "airllm", "--no-plot")
    assert r.returncode == 2 and "peer 'airllm' is not installed" in r.stderr and not (tmp_path / "c").exists(), r.stderr[-2000:]
