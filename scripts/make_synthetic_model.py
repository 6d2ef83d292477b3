#!/usr/bin/env python3
"""Write a random-initialised llama-shaped model as sharded bf16 safetensors, one shard per
streaming group, never holding more than one shard in memory (see :mod:`sli.synthetic`).

    python scripts/make_synthetic_model.py /tmp/llama-8b-shape --shape 8b --tokenizer-from ~/.cache/sli/models/SmolLM2-135M-Instruct
    python scripts/make_synthetic_model.py /tmp/synth-1g --gigabytes 1.1
"""

import argparse
import logging
from pathlib import Path

from sli.synthetic import SHAPES, shape_for_size, write_model

logger = logging.getLogger("make_synthetic_model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shapes")
    ap.add_argument("--gigabytes", type=float, default=1.1, help="without --shape: about this many GB of bf16")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokenizer-from", type=Path, help="a model folder whose tokenizer files are copied in")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = SHAPES[a.shape] if a.shape else shape_for_size(a.gigabytes, a.vocab)
    total = write_model(a.out, s, vocab=a.vocab, seed=a.seed, tokenizer_from=a.tokenizer_from)
    logger.info("%s: %d layers, %.2f GB", a.out, s.layers, total / 1e9)


if __name__ == "__main__":
    main()
