"""``sli bench --scale 1b --limits 903MiB,591MiB``: where the quantized model fits or nearly
fits, beside llama.cpp, in one run.

Each limit is a memory cgroup (anonymous memory and page cache together) that every system
runs in, cold (its files dropped from the page cache first); sli plans with
``memory_budget="auto"`` inside it, so it finds the limit itself, as a user's process would.
Then every system runs warm with no limit (files read into the page cache first; sli with a
budget that holds everything). Each point is a fresh process (:func:`sli.bench_scale._run`);
the figures are decode tok/s, time to first token for the prompt, bytes read from disk per
token, peak anonymous memory over the import baseline, and the tokens, so that sli's cold
tokens can be checked against its tokens in RAM.

llama.cpp runs through its Python binding (``llama-cpp-python`` on the build
``scripts/setup_peers.sh`` picked, ``LLAMA_CPP_LIB_PATH``), as shipped (weights repacked into
anonymous memory at load) and with repacking off (weights used from the mapped file, as sli's
are); it lives in the benchmark's own environment, never in sli's dependencies.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sli.bench_scale import LLAMA_MMAP, MemoryCgroup, _run, _warm, drop_caches, import_baseline, memory_bandwidth

logger = logging.getLogger(__name__)


@dataclass
class FitsConfig:
    workdir: str = ""  # default: $SLI_HOME/scale-1b (the model, its Q4_0 and sli's cache)
    shape: str = "1b"
    limits: tuple[str, ...] = ("903MiB", "591MiB")
    peers: tuple[str, ...] = ("llama.cpp",)
    prompt_tokens: int = 512
    new_tokens: int = 16
    timeout_s: int = 1800
    out_dir: str = "docs/results"


def run_fits(cfg: FitsConfig, progress=logger.info) -> dict[str, Any]:
    from runtime.memory import parse_size

    work = Path(cfg.workdir or Path(os.environ.get("SLI_HOME") or Path.home() / ".cache" / "sli") / f"scale-{cfg.shape}")
    model, gguf, cache = work / f"llama-{cfg.shape}-shape", work / f"llama-{cfg.shape}-q4_0.gguf", work / "cache-int4-default"
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"no {cfg.shape} model at {model}: run `sli bench --scale {cfg.shape} --keep` (or make peers) first")
    res: dict[str, Any] = {"config": asdict(cfg), "host": {"cpus": os.cpu_count()}, "points": [], "notes": []}
    if not (cache / "data.mdb").exists():
        progress("quantizing to int4 with sli's defaults")
        drop_caches([model])
        q, err = _run({"kind": "quantize", "model": str(model), "mode": "int4", "cache_dir": str(cache)}, cfg.timeout_s)
        res["quantize"] = {**q, "error": err}
    res["host"]["cache_bytes"] = sum(f.stat().st_size for f in cache.glob("*.mdb"))
    # the derived kernel copy is built by a first, short run (not measured)
    _run({"kind": "sli", "model": str(model), "mode": "int4", "cache_dir": str(cache), "budget": "64GB",
          "context_tokens": 64, "prompt_tokens": 8, "new_tokens": 2}, cfg.timeout_s)
    res["host"]["derived_bytes"] = sum(f.stat().st_size for f in (cache / "derived").rglob("*.mdb"))
    systems = ["sli"]
    if "llama.cpp" in cfg.peers:
        if gguf.exists():
            res["host"]["gguf_bytes"] = gguf.stat().st_size
            systems += ["llama.cpp", LLAMA_MMAP]
        else:
            res["notes"].append(f"llama.cpp left out: no {gguf} (sli bench --scale {cfg.shape} --llama-convert ... --keep makes it)")
    res["host"]["import_baseline_bytes"] = import_baseline(model)
    res["host"]["memory_read_Bps"] = memory_bandwidth()
    ctx = cfg.prompt_tokens + cfg.new_tokens + 16
    files = {"sli": [cache], "llama.cpp": [gguf], LLAMA_MMAP: [gguf]}

    def spec(system: str, budget: str) -> dict[str, Any]:
        common = {"model": str(model), "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "context_tokens": ctx}
        if system == "sli":
            return {**common, "kind": "sli", "mode": "int4", "cache_dir": str(cache), "budget": budget}
        return {**common, "kind": "llama.cpp", "gguf": str(gguf), "no_repack": system == LLAMA_MMAP}

    def point(system: str, limit: str | None) -> None:
        cg = None
        if limit is not None:
            try:
                cg = MemoryCgroup(parse_size(limit))
            except OSError as e:
                res["notes"].append(f"no hard limit at {limit}: {e}")
                return
            drop_caches(files[system])
            regime = f"cold, cgroup limit {limit}"
        else:
            _warm(files[system])
            regime = "warm, no limit"
        progress(f"{system}: {regime}")
        try:
            r, err = _run(spec(system, "auto" if limit else "64GB"), cfg.timeout_s, cg)
            if cg is not None and cg.peak_bytes() is not None:
                r["cgroup_peak_bytes"] = cg.peak_bytes()
        finally:
            if cg is not None:
                cg.close()
        res["points"].append({"system": system, "limit": limit or "none", "regime": regime, "result": r, "error": err})

    for limit in cfg.limits:
        for system in systems:
            point(system, limit)
    for system in systems:
        point(system, None)
    return res


def markdown(res: dict[str, Any]) -> str:
    h = res["host"]
    mib = lambda n: f"{n / 2**20:,.0f}" if n else "–"  # noqa: E731
    lines = [
        f"# Where the model fits: the {res['config']['shape']} model in real shapes, beside llama.cpp",
        "",
        f"Host: {h['cpus']} cores, memory reads {h['memory_read_Bps'] / 1e9:.1f} GB/s. sli's int4 cache (its defaults: "
        f"groups of 64, head and embeddings as int8 rows) {mib(h['cache_bytes'])} MiB, its derived kernel copy "
        f"{mib(h.get('derived_bytes'))} MiB; llama.cpp's Q4_0 file {mib(h.get('gguf_bytes'))} MiB. Import baseline "
        f"{mib(h['import_baseline_bytes'])} MiB of anonymous memory. Cold: files dropped from the page cache, the process "
        f"in a memory cgroup of the limit (sli with `--memory-budget auto`). Warm: files read first, no limit. "
        f"Prompt {res['config']['prompt_tokens']} tokens, {res['config']['new_tokens']} tokens decoded (greedy).",
        "",
        "| system | limit | regime | decode tok/s | first token s | prefill tok/s | disk MB/token | peak anon MiB | cgroup peak MiB | plan / note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["points"]:
        r = p["result"]
        note = p["error"] or (r.get("plan", "") if p["system"] == "sli" else "")
        lines.append(
            f"| {p['system']} | {p['limit']} | {p['regime'].split(',')[0]} | {r.get('decode_tok_s', 0):.2f} | {r.get('ttft_s', 0):.2f} | "
            f"{r.get('prefill_tok_s', 0):.0f} | {(r.get('disk_bytes_per_token') or 0) / 1e6:.1f} | {mib(r.get('peak_anon_bytes'))} | "
            f"{mib(r.get('cgroup_peak_bytes'))} | {note.replace('|', '/')[:300]} |")
    lines += ["", "## Ratios", "", "| limit | regime | sli / llama.cpp decode | sli / llama.cpp (no repack) decode | llama.cpp / sli first token |",
              "|---|---|---|---|---|"]
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for p in res["points"]:
        by.setdefault((p["limit"], p["regime"].split(",")[0]), {})[p["system"]] = p["result"]
    for (limit, regime), d in by.items():
        s = d.get("sli", {})
        r = lambda k, key="decode_tok_s": f"{s[key] / d[k][key]:.2f}x" if s.get(key) and d.get(k, {}).get(key) else "–"  # noqa: E731
        t = f"{d['llama.cpp']['ttft_s'] / s['ttft_s']:.2f}x" if s.get("ttft_s") and d.get("llama.cpp", {}).get("ttft_s") else "–"
        lines.append(f"| {limit} | {regime} | {r('llama.cpp')} | {r(LLAMA_MMAP)} | {t} |")
    ram = [p["result"].get("tokens") for p in res["points"] if p["system"] == "sli" and p["limit"] == "none"]
    if ram and ram[0]:
        same = [p["limit"] for p in res["points"] if p["system"] == "sli" and p["result"].get("tokens") == ram[0] and p["limit"] != "none"]
        lines += ["", f"sli's tokens cold under {', '.join(same) or 'no limit'} equal its tokens in RAM."
                  if len(same) == len(res["config"]["limits"]) else f"sli's tokens equal those in RAM only under: {same}"]
    for n in res.get("notes", []):
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def write_fits_outputs(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fits.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "fits.md").write_text(markdown(res))
    return {"json": str(out / "fits.json"), "md": str(out / "fits.md")}
