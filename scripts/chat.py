"""Local chat in the terminal: `python scripts/chat.py MODEL_OR_CACHE --memory-budget 96MB [--mode nf4]`.

Same options as `sli chat` (see `sli chat --help`)."""

import sys

from sli.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
