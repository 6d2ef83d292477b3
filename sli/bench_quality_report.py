"""The report of ``sli bench --quality``: the markdown table, the goals checked against the
figures of the same run, and the plot of perplexity loss against bits per weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def label(row: dict[str, Any]) -> str:
    if row["system"] == "reference":
        return "fp32 reference"
    if row["method"] == "target-loss":
        return f"sli --target-loss {row['target']:g}"
    if row["system"] == "bitsandbytes":
        return "bitsandbytes NF4"
    grid = f"int{row['bits']} g{row['group']}{' sym' if row['sym'] else ''}"
    m, _, order = row["method"].partition(":")
    name = {"rtn": "RTN", "rtn+imp": "RTN+importance", "gptq-plain": "GPTQ (min/max grids)", "gptq": "GPTQ", "awq": "AWQ",
            "awq+gptq": "AWQ+GPTQ"}.get(m, m)
    return f"{row['system']} {name} {grid}" + (f" permuted by {order}" if order else "")


def _loss(row: dict[str, Any], ref: float) -> float | None:
    p = row.get("perplexity")
    return None if p is None or not ref else 100.0 * (p / ref - 1.0)


def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _grid(row: dict[str, Any]) -> tuple | None:
    return (row["bits"], row["group"], row["sym"]) if "bits" in row and row["system"] in ("sli", "llm-compressor") else None


def markdown(rows: list[dict[str, Any]], cfg) -> str:
    ref_row = next((r for r in rows if r["system"] == "reference"), {})
    ref = ref_row.get("perplexity")
    quality = [r for r in rows if not r.get("time_only") and r["system"] != "reference"]
    lines = [
        "# Calibrated quantization: quality, time and memory (`sli bench --quality`)",
        "",
        f"Model: `{Path(cfg.model).name}`. Held-out text: the first {cfg.eval_tokens} tokens of Python's pydoc topics "
        f"(`sli validate`'s text), sliding windows of {cfg.max_length} with stride {cfg.stride}, scored by sli's perplexity "
        "code on transformers' float32 model holding each system's dequantized weights. Calibration (sli and "
        f"llm-compressor alike, the same token ids): {cfg.samples} x {cfg.seqlen} tokens of `sli/data/calibration.txt` "
        "(stdlib docstrings), which no evaluation token comes from. Reference: the unquantized model in float32, "
        f"perplexity {_fmt(ref, '.4f')}. Time: the quantizing call's wall time on this host (2 shared cores); memory: "
        "peak anonymous RSS over the baseline after imports. Bits per weight: on disk over the quantized tensors, and over "
        "every parameter (embeddings, head and norms counted; kept in the source's bf16 unless the system quantizes them).",
        "",
        "| system | bits/weight (quantized) | bits/weight (all) | perplexity | loss % | time s | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in quality:
        if r.get("error"):
            lines.append(f"| {label(r)} | | | | {r['error']} | | |")
            continue
        lines.append(
            f"| {label(r)} | {_fmt(r.get('bits_quantized'))} | {_fmt(r.get('bits_all'))} | {_fmt(r.get('perplexity'), '.4f')} | "
            f"{_fmt(_loss(r, ref), '+.2f')} | {_fmt(r.get('seconds'), '.0f')} | {_fmt((r.get('peak_rss_bytes') or 0) / 1e6, '.0f')} |"
        )
    timed = [r for r in rows if r.get("time_only")]
    if timed:
        lines += ["", f"## Time and memory on the 1 B random-shape model (no quality claim: random weights)", "",
                  f"`{timed[0]['model']}`, {timed[0]['samples']} x {timed[0]['seqlen']} calibration tokens, int4 groups of 64; "
                  f"sli with --memory-budget {timed[0].get('budget') or cfg.scale_budget}.", "",
                  "| system | time s | peak MB | activations |", "|---|---:|---:|---|"]
        for r in timed:
            act = r.get("calibration", {})
            spill = ("spilled" if act.get("spilled") else "in memory") if act else "-"
            lines.append(f"| {label(r)} | {_fmt(r.get('seconds'), '.0f')} | {_fmt((r.get('peak_rss_bytes') or 0) / 1e6, '.0f')} | "
                         f"{spill} |" if not r.get("error") else f"| {label(r)} | {r['error']} | | |")
    lines += ["", "## Goals, checked against the figures above", ""] + goals(rows, ref)
    return "\n".join(lines) + "\n"


def goals(rows: list[dict[str, Any]], ref: float | None) -> list[str]:
    out = []
    ok_rows = [r for r in rows if not r.get("error") and not r.get("time_only") and r.get("perplexity") is not None]
    grids = sorted({_grid(r) for r in ok_rows if _grid(r)}, key=lambda g: (-g[0], g[1], g[2]))
    for g in grids:
        here = [r for r in ok_rows if _grid(r) == g]
        sli_cal = [r for r in here if r["system"] == "sli" and not r["method"].startswith("rtn")]
        rtn = next((r for r in here if r["system"] == "sli" and r["method"] == "rtn"), None)
        peers = [r for r in here if r["system"] == "llm-compressor"]
        if not sli_cal:
            continue
        best = min(sli_cal, key=lambda r: r["perplexity"])
        name = f"int{g[0]} g{g[1]}{' sym' if g[2] else ''}"
        line = f"- {name}: sli's best calibrated is {label(best)} at {_fmt(_loss(best, ref), '+.2f')}%"
        if peers:
            pbest = min(peers, key=lambda r: r["perplexity"])
            met = best["perplexity"] <= pbest["perplexity"]
            line += f"; llm-compressor's best {label(pbest)} at {_fmt(_loss(pbest, ref), '+.2f')}% ({'met' if met else 'NOT met'}: no worse)"
        if rtn is not None:
            half = _loss(best, ref) <= 0.5 * _loss(rtn, ref)
            line += f"; round to nearest {_fmt(_loss(rtn, ref), '+.2f')}% ({'met' if half else 'NOT met'}: at most half)"
        out.append(line + ".")
    tl = next((r for r in ok_rows if r.get("method") == "target-loss"), None)
    if tl is not None:
        loss = _loss(tl, ref)
        under = [r for r in ok_rows if r is not tl and r["system"] != "reference" and _loss(r, ref) is not None and _loss(r, ref) <= tl["target"]]
        fewest = min((r.get("bits_all") or 99 for r in under), default=None)
        met_loss = loss is not None and loss <= tl["target"]
        met_bits = fewest is None or tl["bits_all"] <= fewest
        out.append(
            f"- `--target-loss {tl['target']:g}`: {_fmt(loss, '+.2f')}% on the unseen text ({'met' if met_loss else 'NOT met'}), "
            f"{_fmt(tl['planned_loss_pct'], '+.2f')}% planned and {_fmt(tl.get('heldout_loss_pct'), '+.2f')}% built on the held-out "
            f"calibration slice; {tl['bits_all']:.3f} bits/weight over every parameter ({16 / tl['bits_all']:.2f}x against fp16), "
            + (f"the fewest of the systems under {tl['target']:g}% (next: {fewest:.3f}): {'met' if met_bits else 'NOT met'}."
               if fewest is not None else "no other system measured is under the target.")
        )
    timed = {(r["system"], r["method"]): r for r in rows if r.get("time_only") and not r.get("error")}
    peer = timed.get(("llm-compressor", "gptq"))
    for m in ("gptq", "awq", "awq+gptq"):
        r = timed.get(("sli", m))
        if r is None:
            continue
        line = f"- 1 B shape, sli {m}: {r['seconds']:.0f}s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB " \
               f"({'met' if r['peak_rss_bytes'] <= 2 * 2**30 else 'NOT met'}: within 2 GiB)"
        if peer is not None and m == "gptq":
            ratio = r["seconds"] / peer["seconds"]
            line += (f"; llm-compressor GPTQ {peer['seconds']:.0f}s, peak {peer['peak_rss_bytes'] / 2**30:.2f} GiB: "
                     f"{ratio:.2f}x its time ({'met' if ratio <= 3 else 'NOT met'}: at most 3x)")
        out.append(line + ".")
    return out or ["- no point finished"]


def plot(rows: list[dict[str, Any]], path: Path) -> str:
    from sli.bench import pyplot

    plt = pyplot()

    ref = next((r.get("perplexity") for r in rows if r["system"] == "reference"), None)
    styles = {("sli", "rtn"): ("gray", "o"), ("sli", "gptq"): ("tab:blue", "o"), ("sli", "awq"): ("tab:green", "o"),
              ("sli", "awq+gptq"): ("tab:purple", "o"), ("llm-compressor", "gptq"): ("tab:red", "s"),
              ("llm-compressor", "awq"): ("tab:orange", "s"), ("bitsandbytes", "nf4"): ("black", "^"),
              ("sli", "target-loss"): ("tab:cyan", "*")}
    fig, ax = plt.subplots(figsize=(9, 6))
    seen = set()
    for r in rows:
        if r.get("error") or r.get("time_only") or r["system"] == "reference" or r.get("bits_all") is None:
            continue
        loss = _loss(r, ref)
        if loss is None:
            continue
        k = (r["system"], r["method"].split(":")[0])
        color, marker = styles.get(k, ("black", "x"))
        name = label(r).split(" int", 1)[0] + (" permuted" if ":" in r["method"] else "") if k != ("sli", "target-loss") else label(r)
        ax.scatter([r["bits_all"]], [loss], color=color, marker=marker, s=120 if marker == "*" else 40,
                   label=name if name not in seen else None, zorder=3)
        seen.add(name)
        if "bits" in r:
            ax.annotate(f"{r['bits']}b g{r['group']}{'s' if r['sym'] else ''}", (r["bits_all"], loss), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    for r in rows:
        if r.get("method") == "target-loss":
            ax.axhline(r["target"], color="tab:cyan", linestyle=":", linewidth=1)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("bits per weight, every parameter counted")
    ax.set_ylabel("perplexity loss on held-out text (%, log above 1)")
    ax.set_title("perplexity loss against bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
