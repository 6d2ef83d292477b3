#!/usr/bin/env python3
"""Write ``$SLI_HOME/peers/peers.json``: where each peer is and which versions (stdlib only; run by
``scripts/setup_peers.sh`` at the end of every run, from whatever exists). A missing part is
``null`` with the part of ``setup_peers.sh`` that makes it."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    cp = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return cp.stdout.strip() if cp.returncode == 0 else None


def venv(root: Path, packages: list[str], part: str) -> dict | None:
    py = root / "bin" / "python"
    if not py.exists():
        return {"missing": f"scripts/setup_peers.sh {part}"}
    return {"python": str(py), "versions": {p: version(py, p) for p in packages}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=Path, required=True)
    ap.add_argument("--sli-home", type=Path, required=True)
    ap.add_argument("--llama-src", type=Path, required=True)
    a = ap.parse_args()
    p = a.peers
    llama = p / "llama.cpp"
    best = llama / "best"
    info: dict = {"sli_home": str(a.sli_home), "peers": str(p)}
    if (llama / "best.json").exists() and best.exists():
        b = json.loads((llama / "best.json").read_text())
        bindir = best.resolve() / "bin"
        info["llama.cpp"] = {
            "source": str(a.llama_src), "best": b["best"], "best_dir": str(best.resolve()), "best_link": str(best),
            "flags": b["builds"][b["best"]]["flags"], "best_json": str(llama / "best.json"),
            "lib_dir": str(bindir), "binding_env": {"LLAMA_CPP_LIB_PATH": str(best / "bin")},
            "bin": {n: str(best / "bin" / n) for n in ("llama-server", "llama-quantize", "llama-bench", "llama-cli",
                                                        "llama-completion", "llama-perplexity")
                    if (bindir / n).exists()},
            "builds": {k: {"dir": v["dir"], "ok": "error" not in v, **({"error": v["error"]} if "error" in v else {})}
                       for k, v in b["builds"].items()},
            "convert_hf_to_gguf": str(a.llama_src / "convert_hf_to_gguf.py"),
            "gguf_py": str(a.llama_src / "gguf-py"),
        }
    else:
        info["llama.cpp"] = {"missing": "scripts/setup_peers.sh llama"}
    rpc = llama / "rpc-avx2"
    if (rpc / ".built").exists():
        info["llama.cpp-rpc"] = {"dir": str(rpc), "flags": (rpc / ".built").read_text().strip(),
                                 "bin": {n: str(rpc / "bin" / n) for n in ("ggml-rpc-server", "llama-bench",
                                                                           "llama-batched-bench", "llama-quantize",
                                                                           "llama-completion")
                                         if (rpc / "bin" / n).exists()},
                                 "measure": "scripts/peers/llama_rpc.py"}
    else:
        info["llama.cpp-rpc"] = {"missing": "scripts/setup_peers.sh llama-rpc"}
    info["venv-bench"] = venv(p / "venv-bench", ["torch", "transformers", "sli", "llama_cpp_python", "lm_eval",
                                                  "airllm", "gguf", "sentencepiece", "matplotlib"], "venv-bench")
    info["venv-llmcompressor"] = venv(p / "venv-llmcompressor", ["torch", "transformers", "llmcompressor",
                                                                 "compressed-tensors"], "llmcompressor")
    bench_py = p / "venv-bench" / "bin" / "python"
    air = version(bench_py, "airllm")
    info["airllm"] = {"python": str(bench_py), "version": air} if air else {"missing": "scripts/setup_peers.sh airllm"}
    if air and (p / "airllm-status.json").exists():
        st = json.loads((p / "airllm-status.json").read_text() or "{}")
        info["airllm"]["check"] = {k: st.get(k) for k in ("tokens_equal", "load_s", "generate_s", "error")}
    lm_eval = p / "venv-bench" / "bin" / "lm_eval"
    info["lm_eval"] = {"bin": str(lm_eval), "python": str(p / "venv-bench" / "bin" / "python")} if lm_eval.exists() else {
        "missing": "scripts/setup_peers.sh lmeval"}
    work = a.sli_home / "scale-1b"
    model, gguf = work / "llama-1b-shape", work / "llama-1b-q4_0.gguf"
    info["model-1b"] = {"model": str(model) if (model / "model.safetensors.index.json").exists() else None,
                        "q4_0_gguf": str(gguf) if gguf.exists() else None,
                        "q4_0_bytes": gguf.stat().st_size if gguf.exists() else None}
    if info["model-1b"]["model"] is None or info["model-1b"]["q4_0_gguf"] is None:
        info["model-1b"]["missing"] = "scripts/setup_peers.sh model-1b"
    out = p / "peers.json"
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
