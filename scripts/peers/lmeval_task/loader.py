"""The task's data, read from the JSON lines file beside this file (lm-eval's ``custom_dataset``:
nothing is fetched from a dataset hub)."""

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "sli_mc.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
