"""Medusa: the heads' forward against a dense computation; greedy medusa gives greedy's tokens (random and fitted
heads on a tiny model, the shipped heads on the embedded model, full and evicting caches); the typical acceptance
rule on hand-made distributions; bad input refused; the shipped heads accept more than one token per pass."""

import math

import pytest
import torch

import workbench as wb
from workbench.decode.medusa import MedusaHeads, heads_path

PROMPT = "Repeat after me: a stitch in time saves nine. a stitch in time"


def random_heads(model, n: int = 3, seed: int = 0) -> MedusaHeads:
    heads = MedusaHeads(model.text_config.hidden_size, n)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return heads


def fitted_heads(model, tokens: list[int], n: int = 3) -> MedusaHeads:
    """Heads overfitted to `tokens` (the model's own greedy text), so that drafts get accepted and the
    kept-prefix path (the hidden state at a draft position) runs."""
    with torch.no_grad():
        hidden = model.hf(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states[-1][0]
    heads = MedusaHeads(model.text_config.hidden_size, n)
    lm_head = model.hf.get_output_embeddings().requires_grad_(False)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    rows = len(tokens) - 1 - n
    labels = torch.tensor([[tokens[t + 1 + i] for i in range(1, n + 1)] for t in range(rows)])
    for _ in range(150):
        logits = heads(hidden[:rows], lm_head)  # (n, rows, vocab)
        loss = sum(torch.nn.functional.cross_entropy(logits[i], labels[:, i]) for i in range(n))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm_head.requires_grad_(True)
    return heads.requires_grad_(False)


def accepted(run) -> list[int]:
    drafted = run.steps["verify_drafted"].values
    return run.steps["verify_accepted"].values[drafted >= 0].tolist()


def test_heads_forward_equals_a_dense_computation(tiny_llama):
    heads = random_heads(tiny_llama, 3)
    lm_head = tiny_llama.hf.get_output_embeddings()
    hidden = torch.randn(5, tiny_llama.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    embedding = lm_head.weight.detach()
    expected = []
    for block in heads.blocks:
        w, b = block.weight.detach(), block.bias.detach()
        z = hidden @ w.T + b
        expected.append((hidden + z / (1 + torch.exp(-z))) @ embedding.T)  # x + SiLU(Wx + b), then the LM head
    with torch.no_grad():
        torch.testing.assert_close(heads(hidden, lm_head), torch.stack(expected))
        torch.testing.assert_close(heads(hidden, lm_head, 2), torch.stack(expected[:2]))


def test_untrained_heads_start_as_the_lm_head(tiny_llama):
    """Zero-initialised blocks (as in the reference): x + SiLU(0) = x, so each head's logits are the LM head's."""
    heads = MedusaHeads(tiny_llama.text_config.hidden_size, 2)
    lm_head = tiny_llama.hf.get_output_embeddings()
    hidden = torch.randn(3, tiny_llama.text_config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(heads(hidden, lm_head), lm_head(hidden).expand(2, -1, -1))


@pytest.mark.parametrize("tree", ["default", "chain", [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]])
@pytest.mark.parametrize("cache", ["full", "snapkv", "h2o"])  # h2o acts on provisional rows: the chain is verified
def test_greedy_medusa_equals_greedy_on_a_tiny_model(tiny_llama, cache, tree, tmp_path):
    policy = {"full": "full", "snapkv": wb.cache.get("snapkv", budget=40, window=8),
              "h2o": wb.cache.get("h2o", budget=40)}[cache]
    greedy = wb.generate(tiny_llama, PROMPT, cache=policy, max_new_tokens=40, ignore_eos=True)
    fitted = fitted_heads(tiny_llama, greedy.prompt_ids + greedy.token_ids)
    path = tmp_path / "heads.pt"
    random_heads(tiny_llama, 3, seed=2).save(path, tiny_llama.name)
    for heads, k in ((random_heads(tiny_llama, 3), 3), (random_heads(tiny_llama, 3), 1), (str(path), 2),
                     (fitted, 3)):
        decoder = wb.decode.get("medusa", heads=heads, k=k, tree=tree)
        run = wb.generate(tiny_llama, PROMPT, cache=policy, decoder=decoder, max_new_tokens=40, ignore_eos=True,
                          record="decoding")
        assert run.token_ids == greedy.token_ids, (cache, k)
        tree_passes = run.trace["verify_candidates"].values > run.trace["verify_drafted"].values
        assert tree_passes.any() == (tree != "chain" and cache != "h2o"), (cache, k)  # k = 1: a tree of width
    if cache == "full":  # the fitted heads' drafts are accepted: the kept-prefix path ran
        assert sum(accepted(run)) > 10


def test_typical_acceptance_on_hand_made_distributions():
    """Draft token x is kept while p(x) > min(epsilon, alpha * exp(-H(p))); the token after the kept prefix is
    drawn from p without the tokens under that threshold."""
    decoder = wb.decode.get("medusa", greedy=False, k=2, heads=None)
    flat = torch.tensor([0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0])  # H = log 4: threshold min(0.09, 0.3/4) = 0.075
    peaked = torch.tensor([0.86, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02])
    h = -(peaked * peaked.log()).sum()
    assert 0.3 * math.exp(-h) > 0.09  # the threshold there is epsilon = 0.09: only token 0 passes
    rows = torch.stack([flat, peaked, flat]).clamp_min(1e-12).log()  # after the pending token, after each draft
    ctx = type("Ctx", (), {"rng": torch.Generator().manual_seed(0)})()
    target = decoder.probabilities(rows)
    for _ in range(20):
        assert decoder.keep(ctx, rows, target, [3, 5], None) == (1, 0)  # 3 kept (0.25 > 0.075), 5 not (0.02)
    kept, after = decoder.keep(ctx, rows, target, [1, 0], None)  # both kept: the bonus from the flat row
    assert kept == 2 and after in (0, 1, 2, 3)
    assert decoder.keep(ctx, rows, target, [6, 0], None)[0] == 0  # p = 0 is never above the threshold


def test_typical_acceptance_with_no_threshold_keeps_every_draft(tiny_llama):
    """epsilon = alpha = 0: every draft token with p > 0 is kept, so every verify pass keeps all k."""
    decoder = wb.decode.get("medusa", heads=random_heads(tiny_llama, 3), k=3, greedy=False, epsilon=0.0,
                            alpha=0.0, temperature=0.8)
    run = wb.generate(tiny_llama, PROMPT, decoder=decoder, max_new_tokens=30, ignore_eos=True, record="decoding")
    kept = accepted(run)
    assert kept and set(kept[:-1]) == {3}  # the last pass may be cut short by max_new_tokens
    assert len(run.token_ids) == 30


def test_bad_input_is_refused(tiny_llama):
    with pytest.raises(wb.ParameterError, match="medusa has no heads for model tiny-llama; train them with "
                                                "bench/train_medusa.py"):
        wb.generate(tiny_llama, PROMPT, decoder="medusa", max_new_tokens=8)
    with pytest.raises(wb.ParameterError, match="k must be in 1..3"):
        wb.decode.get("medusa", heads=random_heads(tiny_llama, 3), k=4)
    with pytest.raises(wb.ParameterError, match="no file at"):
        wb.generate(tiny_llama, PROMPT, decoder=wb.decode.get("medusa", heads="/nonexistent/heads.pt"),
                    max_new_tokens=8)
    with pytest.raises(wb.ParameterError, match="parameter 'tree' is 'wide'; give 'default', 'chain'"):
        wb.decode.get("medusa", heads=random_heads(tiny_llama, 3), k=3, tree="wide")
    typed = wb.decode.get("medusa", heads=random_heads(tiny_llama, 3), k=3, tree="[(0,), (1,), (0, 0)]")
    assert typed.choices() == ((0,), (1,), (0, 0))  # a tree typed in the CLI or the panel
    with pytest.raises(wb.ParameterError, match=r"tree node \(1, 0\) has no parent"):
        wb.decode.get("medusa", heads=random_heads(tiny_llama, 3), k=3, tree=[(0,), (1, 0)])
    with pytest.raises(wb.ParameterError, match="hidden size"):
        wb.generate(tiny_llama, PROMPT, decoder=wb.decode.get("medusa", heads=MedusaHeads(8, 4)), max_new_tokens=8)


INPUT_GROUNDED = [{"role": "user", "content": "Repeat this sentence word for word: The old lighthouse keeper "
                                              "climbed the stairs every evening to light the lamp for the ships."}]


@pytest.mark.embedded
def test_heads_are_shipped_for_the_embedded_model(embedded):
    path = heads_path(embedded.name)
    assert path.is_file() and path.stat().st_size < 16e6


@pytest.mark.embedded
@pytest.mark.parametrize("cache", ["full", "snapkv"])
def test_greedy_medusa_equals_greedy_on_the_embedded_model(embedded, cache):
    policy = "full" if cache == "full" else wb.cache.get("snapkv", budget=64)
    greedy = wb.generate(embedded, INPUT_GROUNDED, cache=policy, max_new_tokens=24, ignore_eos=True)
    run = wb.generate(embedded, INPUT_GROUNDED, cache=policy, decoder="medusa", max_new_tokens=24,
                      ignore_eos=True, record="decoding")
    assert run.token_ids == greedy.token_ids
    if cache == "full":  # behaviour: the shipped heads learned something (tokens per verify pass > 1)
        kept = accepted(run)
        assert sum(k + 1 for k in kept) / len(kept) > 1
