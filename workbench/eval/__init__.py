"""Evaluation: task generators (retrieval, multi-turn, perplexity), the loops that score them on one cache, and
the harness that sweeps cache policies x budgets x tasks x seeds into an xarray.Dataset.

    import workbench as wb
    from workbench import eval as wbe
    model = wb.load()
    ds = wbe.evaluate(model, {"full": [], "snapkv": [128, 512]},
                      tasks=[wbe.Passkey(length=2000), wbe.Perplexity(context=2000)], seeds=2)
    print(wbe.table(ds))

From a shell (the same, with a table printed):  python -m workbench.eval --policies all --budgets 64,128 ...
"""

from workbench.eval.harness import CacheConfig, evaluate, parse_caches
from workbench.eval.multiturn import Conversation, converse, is_correct
from workbench.eval.perplexity import PerplexityResult, perplexity
from workbench.eval.prefill import PrefillRecord, prefill
from workbench.eval.report import table
from workbench.eval.tasks import (TASKS, MultiKey, MultiTurn, Needle, Passkey, Perplexity, RetrievalSample, Task,
                                  TextSample, render)

__all__ = ["evaluate", "parse_caches", "CacheConfig", "converse", "Conversation", "is_correct", "perplexity",
           "PerplexityResult", "PrefillRecord", "prefill", "table", "TASKS", "Task", "Passkey", "Needle", "MultiKey", "MultiTurn",
           "Perplexity", "RetrievalSample", "TextSample", "render"]
