#!/usr/bin/env python3
"""Write a random-initialised llama-shaped model of about --gigabytes GB (bf16) as sharded
safetensors, one shard per streaming group, without ever holding more than one group.

Used to measure quantization memory on a model larger than the real one:
    python scripts/make_synthetic_model.py /tmp/synth-1g --gigabytes 1.1
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gigabytes", type=float, default=1.1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    h, i, v = a.hidden, a.intermediate, a.vocab
    heads, kv = h // 128, max(1, h // 512)
    per_layer = 2 * h * h + 2 * h * (kv * 128) + 3 * h * i + 2 * h
    fixed = 2 * v * h + h
    layers = max(1, round((a.gigabytes * 1e9 / 2 - fixed) / per_layer))
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        vocab_size=v,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.dtype = torch.bfloat16
    a.out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(a.out)
    g = torch.Generator().manual_seed(a.seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    groups = {"embed": {"model.embed_tokens.weight": rand(v, h)}}
    shards = ["embed", *(f"layer.{n}" for n in range(layers)), "head"]
    weight_map = {}
    for idx, name in enumerate(shards):
        if name == "embed":
            tensors = groups.pop("embed")
        elif name == "head":
            tensors = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)}
        else:
            p = f"model.layers.{name.split('.')[1]}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv * 128, h),
                p + "self_attn.v_proj.weight": rand(kv * 128, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        fname = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(a.out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    total = sum(f.stat().st_size for f in a.out.glob("*.safetensors"))
    (a.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    print(f"{a.out}: {layers} layers, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
