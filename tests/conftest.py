"""Shared fixtures: tiny random models (no download) and the real model (fetched once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def dequantized_reference(path, store, variant_id: str):
    """transformers' own model for ``path`` in fp32, holding every weight a cache variant
    decodes to: the reference quantized modes are checked against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.load_state_dict(dict(store.iter_tensors(variant_id, torch.float32)), strict=True)
    return model


def tiny_config(model_type: str, *, layers: int = 2, hidden: int = 64, vocab: int = 320, tie_word_embeddings: bool = False):
    from transformers import AutoConfig

    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type in ("gemma", "qwen3"):
        common["head_dim"] = hidden // 4
    if model_type == "mistral":
        common["sliding_window"] = None
    return AutoConfig.for_model(model_type, **common)


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``word0 .. wordN`` (plus specials), so text APIs run on tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"word{i}": 4 + i for i in range(vocab_size - 4)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_tiny_model(
    root: Path, model_type: str = "llama", *, fmt: str = "safetensors", shards: int = 1, seed: int = 0, **kw
) -> Path:
    """Save a random-initialised model of ``model_type`` under ``root`` and return its folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    # every argument in the name: two tests asking for different models never share (and overwrite) a folder
    out = root / "-".join([model_type, fmt, str(shards), str(seed), *(f"{k}{v}" for k, v in sorted(kw.items()))])
    out.mkdir(parents=True, exist_ok=True)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    save_tiny_tokenizer(out, cfg.vocab_size)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        if shards == 1:
            model.save_pretrained(out)
        else:
            from safetensors.torch import save_file
            import json

            names = list(sd)
            per = -(-len(names) // shards)
            weight_map = {}
            for i in range(shards):
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: sd[n] for n in names[i * per : (i + 1) * per]}
                save_file(part, str(out / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in part})
            (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return out


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> Path:
    return make_tiny_model(tiny_root, "llama", layers=3)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real model's HF folder (fetched on first use; `make test` fetches it beforehand)."""
    from sli.offline.fetch import fetch_model

    return fetch_model()


@pytest.fixture(scope="session")
def real_gguf(real_model) -> Path:
    from sli.offline.fetch import gguf_path

    return gguf_path()
