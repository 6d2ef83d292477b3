"""Random-initialised llama-shaped models with real shapes, written as sharded bf16
safetensors one shard at a time (never more than one shard in memory): the models that speed
and memory are measured on at scale (``sli bench --scale``). Random weights serve for speed
and memory; no quality claim is made on them.

Shapes: ``8b`` is Llama-3.1-8B's, ``1b`` Llama-3.2-1B's. The vocabulary defaults to 49152 so
that the real model's tokenizer (copied in) covers it.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool


SHAPES = {
    "8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, tied=False),  # Llama-3.1-8B
    "1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, tied=True),  # Llama-3.2-1B
}


def shape_for_size(gigabytes: float, vocab: int, hidden: int = 2048, intermediate: int = 5632) -> Shape:
    kv, hd = max(1, hidden // 512), 128
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * hd + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((gigabytes * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return Shape(hidden, intermediate, layers, hidden // hd, kv, hd, tied=False)


def bf16_bytes(s: Shape, vocab: int) -> int:
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    per_layer = 2 * s.hidden * q + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return 2 * (s.layers * per_layer + (1 if s.tied else 2) * vocab * s.hidden + s.hidden)


def write_model(out: Path, s: Shape, *, vocab: int, seed: int = 0, tokenizer_from: Path | None = None) -> int:
    """Write the model; returns its bytes on disk. Refuses when the disk cannot hold it."""
    need = bf16_bytes(s, vocab)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need * 1.05:
        raise OSError(f"{out} has {free / 1e9:.1f} GB free; this model needs {need / 1e9:.1f} GB. Free space or pick another --out")
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=s.tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.dtype = torch.bfloat16
    cfg.architectures = ["LlamaForCausalLM"]  # what converters (llama.cpp's) read the model class from
    cfg.save_pretrained(out)
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).exists():
                shutil.copy(tokenizer_from / f, out / f)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    ones = lambda: torch.ones(s.hidden, dtype=torch.bfloat16)  # noqa: E731
    shards = ["embed", *(f"layer.{n}" for n in range(s.layers)), "head"]
    weight_map = {}
    for idx, name in enumerate(tqdm(shards, desc=f"writing {out.name}", unit="shard")):
        if name == "embed":
            tensors = {"model.embed_tokens.weight": rand(vocab, s.hidden)}
        elif name == "head":
            tensors = {"model.norm.weight": ones()}
            if not s.tied:
                tensors["lm_head.weight"] = rand(vocab, s.hidden)
        else:
            p = f"model.layers.{name.split('.')[1]}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(q, s.hidden),
                p + "self_attn.k_proj.weight": rand(kv, s.hidden),
                p + "self_attn.v_proj.weight": rand(kv, s.hidden),
                p + "self_attn.o_proj.weight": rand(s.hidden, q),
                p + "mlp.gate_proj.weight": rand(s.intermediate, s.hidden),
                p + "mlp.up_proj.weight": rand(s.intermediate, s.hidden),
                p + "mlp.down_proj.weight": rand(s.hidden, s.intermediate),
                p + "input_layernorm.weight": ones(),
                p + "post_attention_layernorm.weight": ones(),
            }
        fname = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total
