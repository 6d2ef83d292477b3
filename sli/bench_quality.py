"""`sli bench --quality`: calibrated quantization against round to nearest and against
llm-compressor, on text no calibration saw, every system scored by the same code.

Every point runs in its own process (time and peak anonymous memory over the baseline after
imports are its own) and is appended to ``<work>/quality.jsonl`` as it finishes, so an
interrupted run resumes where it stopped. Quality: the perplexity of transformers' own model
(float32) holding the point's dequantized weights, on the first ``eval_tokens`` tokens of
Python's pydoc topics (the text ``sli validate`` scores; the calibration text is stdlib
docstrings), by sli's sliding-window perplexity (``runtime.evaluate``), against the float32
unquantized model. llm-compressor runs in its own environment
(``$SLI_HOME/peers/venv-llmcompressor``, ``scripts/quality_llmcompressor.py``) on the same
calibration token ids and writes dequantized weights, which are scored here. Outputs:
``quality.md``, ``quality.json`` and ``quality.png`` (perplexity loss against bits per weight).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sli.bench_quality_report import label, markdown, plot

logger = logging.getLogger(__name__)

GRID = ("int4-g32", "int4-g32-sym", "int4-g64", "int4-g64-sym", "int4-g128", "int4-g128-sym", "int3-g64")
# ":order": channel permutation; calibrated methods choose each group's grid by importance (cache.wgrid), "-plain" ones
# by min/max; "rtn+imp": round to nearest on importance-weighted grids (calibration statistics, no GPTQ)
METHODS = ("rtn", "rtn+imp", "gptq-plain", "gptq", "awq", "awq+gptq", "rtn:weight", "gptq:activation")
PEERS = ("llmcompressor-gptq", "llmcompressor-awq", "bnb-nf4")
RESULT_MARK = "SLI-QUALITY-RESULT "


@dataclass
class QualityBenchConfig:
    """What ``sli bench --quality`` runs. ``samples`` x ``seqlen`` calibration tokens for every
    calibrated system (sli's and llm-compressor's, the same ids)."""

    model: str
    out_dir: str = "docs/results"
    work_dir: str = ""  # default $SLI_HOME/bench-quality
    grid: tuple[str, ...] = GRID
    methods: tuple[str, ...] = METHODS
    peers: tuple[str, ...] = PEERS
    samples: int = 32
    seqlen: int = 512
    eval_tokens: int = 2048
    max_length: int = 512
    stride: int = 256
    target_loss: float | None = 2.0
    scale_model: str = ""  # the 1 B random-shape model (time and memory only); "" skips
    scale_samples: int = 16
    scale_budget: str = "2GiB"
    llmcompressor_python: str = ""  # default $SLI_HOME/peers/venv-llmcompressor/bin/python
    timeout_s: int = 6 * 3600
    extra: dict[str, Any] = field(default_factory=dict)


def parse_point(p: str) -> tuple[int, int, bool]:
    """``int4-g64-sym`` -> (4, 64, True)."""
    parts = p.split("-")
    return int(parts[0].removeprefix("int")), int(parts[1].removeprefix("g")), parts[-1] == "sym"


def _widths_allow(model: str, group: int) -> tuple[bool, str]:
    from sli.offline.sources import open_source

    cfg = open_source(model).config
    widths = {int(cfg.hidden_size), int(cfg.intermediate_size)}
    bad = sorted(w for w in widths if w % group)
    return (not bad, f"input widths {bad} are not multiples of {group}" if bad else "")


def specs(cfg: QualityBenchConfig) -> list[dict[str, Any]]:
    """Every point of the run, in order."""
    out: list[dict[str, Any]] = [{"system": "reference", "method": "fp32", "model": cfg.model}]
    for point in cfg.grid:
        bits, group, sym = parse_point(point)
        ok, why = _widths_allow(cfg.model, group)
        for m in cfg.methods:
            out.append({"system": "sli", "method": m, "bits": bits, "group": group, "sym": sym, "model": cfg.model, "skip": why,
                        "grids": "importance"})  # in the key: points measured before importance-weighted grids are not reused
        for peer in cfg.peers:
            if peer.startswith("llmcompressor-"):
                out.append({"system": "llm-compressor", "method": peer.split("-", 1)[1], "bits": bits, "group": group, "sym": sym,
                            "model": cfg.model, "skip": why or ("" if bits in (4, 8) or peer.endswith("gptq") or peer.endswith("awq") else "")})
    if "bnb-nf4" in cfg.peers:
        out.append({"system": "bitsandbytes", "method": "nf4", "bits": 4, "group": 64, "sym": True, "model": cfg.model})
    if cfg.target_loss:
        out.append({"system": "sli", "method": "target-loss", "target": cfg.target_loss, "model": cfg.model})
    if cfg.scale_model:
        for m in ("gptq", "awq", "awq+gptq"):
            out.append({"system": "sli", "method": m, "bits": 4, "group": 64, "sym": False, "model": cfg.scale_model, "time_only": True,
                        "budget": cfg.scale_budget})
        out.append({"system": "llm-compressor", "method": "gptq", "bits": 4, "group": 64, "sym": False, "model": cfg.scale_model,
                    "time_only": True})
    for s in out:
        s.setdefault("samples", cfg.scale_samples if s.get("time_only") else cfg.samples)
        s["seqlen"] = cfg.seqlen
        s["eval"] = {"tokens": cfg.eval_tokens, "max_length": cfg.max_length, "stride": cfg.stride}
    return out


def key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "skip"}, sort_keys=True).encode()).hexdigest()[:16]


# -- the worker (one point, in its own process) --------------------------------------------------
def _calibration_ids(model: str, samples: int, seqlen: int):
    from sli.offline.calibrate import source_tokenizer
    from sli.offline.calibration import CalibrationConfig, calibration_set
    from sli.offline.sources import open_source

    cal = CalibrationConfig(samples=samples, seqlen=seqlen)
    return cal, calibration_set(cal, source_tokenizer(open_source(model))).samples


def _eval_ids(model: str, n: int):
    import torch

    from runtime.evaluate import default_text
    from sli.offline.calibrate import source_tokenizer
    from sli.offline.sources import open_source

    return torch.tensor(source_tokenizer(open_source(model))(default_text())["input_ids"][:n])


def _perplexity(model_path: str, state: dict, ev: dict) -> float:
    """sli's sliding-window perplexity of transformers' float32 model holding ``state``."""
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.evaluate import perplexity

    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if state:
        missing, unexpected = m.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(m.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"dequantized weights do not fit the model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        if tied:
            m.tie_weights()
    ids = _eval_ids(model_path, ev["tokens"])
    return perplexity(m, ids, max_length=ev["max_length"], stride=ev["stride"]).perplexity


def _plan(spec: dict[str, Any], cal):
    import dataclasses

    from sli.offline.config import QuantizationConfig

    if spec["system"] == "bitsandbytes":
        return QuantizationConfig(mode="nf4")
    m, _, order = spec["method"].partition(":")  # "gptq:activation": channels permuted by activation scale
    m, plain = m.removesuffix("-plain"), m.endswith("-plain")
    if m == "rtn":
        calib = None
    elif m == "rtn+imp":
        calib = dataclasses.replace(cal, method="rtn")
    else:
        calib = dataclasses.replace(cal, method=m, importance=not plain)
    return QuantizationConfig(mode=f"int{spec['bits']}", group_size=spec["group"], symmetric=spec["sym"], calibration=calib,
                              permute=order or "none")


def _sli_point(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch

    from cache.store import LayerStore
    from runtime.memory import parse_size
    from sli.offline.sources import open_source
    from sli.offline.writer import quantize_model

    cal, _ = _calibration_ids(spec["model"], spec["samples"], spec["seqlen"])
    cache = work / "caches" / key(spec)
    shutil.rmtree(cache, ignore_errors=True)
    res: dict[str, Any] = {}
    if spec["method"] == "target-loss":
        from sli.processor import UniversalSLIProcessor

        t0 = time.perf_counter()
        p = UniversalSLIProcessor.for_target(spec["model"], target_loss=spec["target"], calibration=cal, cache_dir=cache, progress=False)
        report = p.quantize()
        res["seconds_total"] = time.perf_counter() - t0
        sp = p.salience
        res.update(planned_loss_pct=sp.loss, planned_bits_all=sp.bits_all, plan=sp.counts(), steps=sp.steps,
                   row_losses=sp.row_losses, heldout_loss_pct=p.heldout_loss())
        vid = report.variant_id
        p.close()
    else:
        budget = parse_size(spec["budget"]) if spec.get("budget") else None
        with LayerStore(cache) as st:
            report = quantize_model(open_source(spec["model"]), _plan(spec, cal), st, progress=False, memory_budget=budget)
        vid = report.variant_id
    res.update(seconds=report.seconds, peak_rss_bytes=report.peak_rss_bytes, bits_all=report.bits_per_weight,
               bits_quantized=_quantized_bits(report), stored_bytes=report.stored_bytes, params=report.num_parameters)
    with LayerStore(cache, readonly=True) as st:
        m = st.require_manifest(vid)
        res["calibration"] = m.extra.get("calibration", {})
        if not spec.get("time_only"):
            state = dict(st.iter_tensors(vid, torch.float32))
            res["perplexity"] = _perplexity(spec["model"], state, spec["eval"])
    shutil.rmtree(cache, ignore_errors=True)
    return res


def _quantized_bits(report) -> float:
    params = sum(c["params"] for k, c in report.codec_bytes.items() if k != "raw")
    stored = sum(c["stored"] for k, c in report.codec_bytes.items() if k != "raw")
    return 8 * stored / params if params else float("nan")


def _llmc_point(spec: dict[str, Any], work: Path, python: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    if not Path(python).is_file():
        raise FileNotFoundError(f"llm-compressor's environment is missing ({python}); build it: scripts/setup_peers.sh llmcompressor")
    _, ids = _calibration_ids(spec["model"], spec["samples"], spec["seqlen"])
    folder = work / "peers" / key(spec)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.save(ids, folder / "ids.pt")
    script = Path(__file__).resolve().parents[1] / "scripts" / "quality_llmcompressor.py"
    # one torch thread: on this 2-core host two OpenMP threads wait on each other at every small step of GPTQ's
    # column loop (sli's loop runs on one thread for the same reason); measured 13.7 s for one 576x576 GPTQ with two
    cmd = [python, str(script), spec["model"], "--method", spec["method"], "--bits", str(spec["bits"]), "--group-size",
           str(spec["group"]), "--ids", str(folder / "ids.pt"), "--out", str(folder), "--threads", str(spec.get("peer_threads", 1))]
    if spec["sym"]:
        cmd.append("--symmetric")
    if spec.get("time_only"):
        cmd.append("--no-weights")
    cp = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if cp.returncode:
        raise RuntimeError(f"llm-compressor failed ({cp.returncode}): {(cp.stderr.strip().splitlines() or ['no output'])[-1]}")
    res = json.loads((folder / "result.json").read_text())
    # bits as compressed-tensors stores them: codes, a 16-bit scale per group, and a zero point of `bits` bits when asymmetric
    res["bits_quantized"] = spec["bits"] + (16 + (0 if spec["sym"] else spec["bits"])) / spec["group"]
    if not spec.get("time_only"):
        state = load_file(str(folder / "model.safetensors"))
        res["perplexity"] = _perplexity(spec["model"], state, spec["eval"])
        res["bits_all"] = _bits_all(spec["model"], state, res["bits_quantized"])
    shutil.rmtree(folder, ignore_errors=True)
    return res


def _bits_all(model: str, state: dict, qbits: float) -> float:
    """Bits per weight over every parameter: quantized linears at ``qbits``, the rest in the source's dtype."""
    from sli.offline.sources import open_source

    src = open_source(model)
    total = bits = 0.0
    for n in src.tensor_names():
        shape, dtype = src.tensor_meta(n)
        k = math.prod(shape)
        quantized = ".layers." in n and n.endswith("proj.weight")
        total += k
        bits += k * (qbits if quantized else (16 if dtype in ("bfloat16", "float16") else 32))
    return bits / total


def worker_main() -> int:
    spec, work, python = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.WARNING)
    try:
        if spec["system"] == "reference":
            res = {"perplexity": _perplexity(spec["model"], {}, spec["eval"])}
        elif spec["system"] == "llm-compressor":
            res = _llmc_point(spec, work, python)
        else:
            res = _sli_point(spec, work)
    except Exception as e:  # noqa: BLE001 - the driver records it beside the point
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
    return 0


# -- the driver --------------------------------------------------------------------------------
def run_quality(cfg: QualityBenchConfig, progress=None) -> list[dict[str, Any]]:
    """Run (or resume) every point; returns the rows (spec + result)."""
    from sli.offline.fetch import sli_home

    work = Path(cfg.work_dir or sli_home() / "bench-quality")
    work.mkdir(parents=True, exist_ok=True)
    python = cfg.llmcompressor_python or str(sli_home() / "peers" / "venv-llmcompressor" / "bin" / "python")
    log = work / "quality.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    rows = []
    for spec in specs(cfg):
        k = key(spec)
        if k in done and not done[k].get("error"):
            rows.append(done[k])
            continue
        if spec.get("skip"):
            row = {**spec, "key": k, "error": f"skipped: {spec['skip']}"}
        else:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-c", "import sys; from sli.bench_quality import worker_main; sys.exit(worker_main())",
                   json.dumps(spec), str(work), python]
            try:
                cp = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s,
                                    env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                res = next((json.loads(ln.split(" ", 1)[1]) for ln in cp.stdout.splitlines() if ln.startswith(RESULT_MARK)),
                           {"error": (cp.stderr.strip().splitlines() or ["no output"])[-1]})
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {cfg.timeout_s}s"}
            row = {**spec, **res, "key": k, "wall_s": time.perf_counter() - t0}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        if progress:
            progress(row)
    return rows


def _order(row: dict[str, Any]) -> tuple:
    systems = {"reference": 0, "sli": 1, "llm-compressor": 2, "bitsandbytes": 3}
    methods = {"rtn": 0, "rtn:weight": 1, "gptq": 2, "gptq:activation": 3, "awq": 4, "awq+gptq": 5, "target-loss": 9}
    return (bool(row.get("time_only")), row["system"] == "bitsandbytes" or row.get("method") == "target-loss",
            -row.get("bits", 99), row.get("group", 0), bool(row.get("sym")), systems.get(row["system"], 5), methods.get(row.get("method"), 6))


def all_rows(cfg: QualityBenchConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows and those of earlier runs in the same work directory on the same model,
    calibration size and evaluation (a run may add points to another's), the latest per point."""
    from sli.offline.fetch import sli_home

    log = Path(cfg.work_dir or sli_home() / "bench-quality") / "quality.jsonl"
    by_key = {}
    ev = {"tokens": cfg.eval_tokens, "max_length": cfg.max_length, "stride": cfg.stride}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            same = r.get("eval") == ev and r.get("seqlen") == cfg.seqlen and (
                (r.get("model") == cfg.model and r.get("samples") == cfg.samples) or (r.get("time_only") and r.get("model") == cfg.scale_model))
            if same:
                by_key[r["key"]] = r
    for r in rows:
        by_key[r["key"]] = r
    return sorted(by_key.values(), key=_order)


def write_outputs(rows: list[dict[str, Any]], cfg: QualityBenchConfig) -> dict[str, str]:

    rows = all_rows(cfg, rows)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1, default=str) + "\n")
    (out / "quality.md").write_text(markdown(rows, cfg))
    paths = {"json": str(out / "quality.json"), "markdown": str(out / "quality.md")}
    paths["png"] = plot(rows, out / "quality.png")  # a missing matplotlib is an ImportError that names the fix
    return paths
