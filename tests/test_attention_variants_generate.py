"""Every sparse and alternative attention variant runs in a real generation (prefill + decode on the tiny Llama,
GQA 4/2 heads) and records a trace; a pattern that covers everything generates what dense attention does."""

import numpy as np
import pytest

import workbench as wb
from workbench.attention.block_sparse import BlockSparse
from workbench.attention.entropy_guided import EntropyGuided
from workbench.attention.heterogeneous import MPCViT
from workbench.attention.hybrid import Hybrid
from workbench.attention.pbs import PBS
from workbench.attention.topk_retrieval import TopKRetrieval
from workbench.attention.window import SinkWindow, SlidingWindow

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2  # 90 byte tokens

VARIANTS = [
    SlidingWindow(window=8),
    SinkWindow(sinks=2, window=8),
    Hybrid(every=2, sinks=2, window=8, stride=2, block_size=16),
    BlockSparse(pattern="a_shape", sinks=2, window=8),
    BlockSparse(vertical=4, slash=4, last_q=8),
    BlockSparse(pattern="block_topk", block_size=16, top_k=1),
    PBS(block_size=16, segment=32, top_k=1, last_q=8),
    TopKRetrieval(top_k=8, sinks=1, window=4),
    TopKRetrieval(select="pages", top_k=16, page_size=8, sinks=1, window=4),
    MPCViT(kind="relu", heads="1"),
    MPCViT(kind="linear", fraction=0.5),
    EntropyGuided(),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variant_generates_and_records(tiny_llama, variant):
    run = wb.generate(tiny_llama, PROMPT, attention=variant, max_new_tokens=4, record="entropy",
                      ignore_eos=True)
    assert len(run.token_ids) == 4
    entropy = run.steps["attention_entropy"].values
    assert entropy.shape == (4, tiny_llama.num_layers, tiny_llama.num_heads) and np.isfinite(entropy).all()
    assert run.config["attention"] == variant.name


def test_sparse_pattern_changes_attention_and_covering_pattern_does_not(tiny_llama):
    dense = wb.generate(tiny_llama, PROMPT, max_new_tokens=4, record="entropy", ignore_eos=True)
    covering = wb.generate(tiny_llama, PROMPT, attention=SinkWindow(sinks=0, window=1024), max_new_tokens=4,
                           record="entropy", ignore_eos=True)
    narrow = wb.generate(tiny_llama, PROMPT, attention=SlidingWindow(window=2), max_new_tokens=4,
                         record="entropy", ignore_eos=True)
    assert covering.token_ids == dense.token_ids
    np.testing.assert_allclose(covering.steps["attention_entropy"].values, dense.steps["attention_entropy"].values,
                               atol=1e-4)
    assert narrow.steps["attention_entropy"].values.max() <= np.log(2) + 1e-5  # two keys at most
