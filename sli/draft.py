"""The draft model of speculative decoding (``speculative="draft"``): a small model with the
same tokenizer, held resident (no memory budget: it is read once and stays), that proposes
tokens greedily for the streamed model to verify (:mod:`runtime.speculative`).

``draft`` may be a processor, a model folder or cache directory, or the name of a plan
(``"int4"``, ``"nf4"``, ...): the target model's own variant of that plan, from its cache (built
into it when absent). A 4-bit variant of the model is a valid draft of its int8 or unquantized one.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def open_draft(target, draft):
    """A processor for ``draft`` whose tokenizer is the target processor's.

    Raises:
        ValueError: the tokenizers differ (their sizes and the fix are said).
    """
    from sli.offline.plans import resolve_plan

    processor = type(target)  # the facade's class, passed in: this module is below it
    if isinstance(draft, processor):
        proc = draft
    else:
        # a plan name is the target model's own variant of that plan, in the same cache (a
        # process may write one variant of a cache while it reads another)
        own = isinstance(draft, str) and not Path(draft).expanduser().exists() and _is_plan(resolve_plan, draft)
        source, plan = (target.model_path, draft) if own else (draft, None)
        proc = processor(source, quantization_config=plan, cache_dir=target.cache_dir, dtype=target.dtype,
                         progress=target.progress)
    model = proc.load()
    mine, theirs = target.tokenizer.get_vocab(), proc.tokenizer.get_vocab()
    if mine != theirs:
        differ = sum(1 for t, i in mine.items() if theirs.get(t) != i)
        raise ValueError(
            f"the draft model {proc.model_path} has another tokenizer ({len(theirs)} tokens; {differ} of the model's "
            f"{len(mine)} are missing or numbered differently); a draft must share the model's tokenizer: pick a smaller "
            "model of the same family, or the model's own 4-bit variant (draft='int4')"
        )
    logger.info("draft model %s (%s) held resident: %.1f MiB, beside the model's budget", proc.model_path,
                getattr(proc.plan, "mode", "mixed"), model.plan.planned_bytes / 2**20)
    return proc


def _is_plan(resolve_plan, name: str) -> bool:
    try:
        resolve_plan(name)
    except KeyError:
        return False
    return True
