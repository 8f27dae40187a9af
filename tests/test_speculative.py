"""Speculative decoders: the acceptance rule keeps the target's distribution (chi-square tests, seeded, stated
false-failure rate), greedy mode gives plain greedy's tokens with full and evicting caches, bad input is refused."""

import pytest
import torch

import workbench as wb
from workbench.decode.prompt_lookup import NgramIndex
from workbench.decode.speculative import accept
from workbench.run.context import StepContext

# chi-square critical values at a false-failure rate of 1e-4 (P(X > c) = 1e-4): each distribution test below fails
# by chance once in 10,000 runs; the draws are seeded, so in CI it either always passes or always fails.
CHI2_7_DOF_1E4 = 29.88  # 8 categories
CHI2_3_DOF_1E4 = 21.11  # 4 categories


def chi_square(draws: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=len(expected)).double()
    want = expected.double() * len(draws)
    return float(((counts - want) ** 2 / want).sum())


def test_greedy_acceptance_keeps_the_argmax_prefix():
    target = torch.eye(5)[[3, 1, 4, 0]]  # the target's argmax after each position: 3, 1, 4, then 0
    assert accept(target, [3, 1, 2], None, None, greedy=True) == (2, 4)  # 2 != 4: rejected, 4 instead
    assert accept(target, [3, 1, 4], None, None, greedy=True) == (3, 0)  # all kept, bonus 0
    assert accept(target, [0, 1, 4], None, None, greedy=True) == (0, 3)


def test_rejection_sampling_emits_the_target_distribution():
    """The first token emitted after one draft token drawn from q is distributed as p, whatever q is."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
    q = torch.tensor([0.05, 0.05, 0.40, 0.05, 0.05, 0.30, 0.05, 0.05])  # far from p: many rejections
    bonus = torch.full((8,), 1 / 8)
    first = []
    for _ in range(20000):
        token = int(torch.multinomial(q, 1, generator=generator))
        kept, after = accept(torch.stack([p, bonus]), [token], q[None], generator, greedy=False)
        first.append(token if kept else after)
    assert chi_square(torch.tensor(first), p) < CHI2_7_DOF_1E4
    # a deterministic draft (q a point mass on token 2, as prompt lookup's) keeps p too
    first = [2 if kept else after for kept, after in
             (accept(torch.stack([p, bonus]), [2], None, generator, greedy=False) for _ in range(20000))]
    assert chi_square(torch.tensor(first), p) < CHI2_7_DOF_1E4


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["speculative", "triforce"])
def test_speculative_sampling_on_a_tiny_model_keeps_the_targets_next_token_distribution(drafter):
    """One speculative step (a different tiny model drafts 2 tokens; or TriForce's hierarchy: that model drafts
    for the target over a 6-token StreamingLLM cache, which drafts 3) after a fixed prompt and pending token, over
    800 seeds: the first token it emits follows the target's own filtered distribution at that point."""
    target, draft = wb.tiny("llama"), wb.tiny("llama", seed=1)
    decoder = (wb.decode.get("speculative", draft_model=draft, k=2, greedy=False, top_k=4) if drafter == "speculative"
               else wb.decode.get("cache_draft", draft_budget=6, tiny_model=draft, k=3, greedy=False, top_k=4))
    prompt = target.encode("speculate")[0].tolist()
    pending = [int(target.encode("!")[0, 0])]
    with wb.Session(target, "full") as session:
        exact = decoder.probabilities(session.feed(prompt + pending, "prefill"))[0]
    support = exact.nonzero().flatten()
    assert len(support) == 4
    first = []
    for seed in range(800):
        with wb.Session(target, "full") as session:
            session.feed(prompt, "prefill")
            ctx = StepContext(session, torch.Generator().manual_seed(seed), pending, None, None,
                              prompt + pending, {"timed_plain": True})  # past the plain step
            first.append(decoder.step(ctx)[0])
    assert set(first) <= set(support.tolist())  # never outside the target's top 4
    positions = torch.searchsorted(support, torch.tensor(first))
    assert chi_square(positions, exact[support]) < CHI2_3_DOF_1E4


@pytest.mark.parametrize("cache", ["full", "h2o", "snapkv"])
def test_greedy_speculative_decoders_equal_greedy_on_a_tiny_model(tiny_llama, cache):
    policy = wb.cache.get(cache) if cache == "full" else wb.cache.get(cache, budget=48, window=8)
    prompt = "Repeat after me: a stitch in time saves nine. a stitch in time saves nine. a stitch"
    greedy = wb.generate(tiny_llama, prompt, cache=policy, max_new_tokens=40, ignore_eos=True)
    decoders = [wb.decode.get("prompt_lookup"), wb.decode.get("speculative", draft_model=tiny_llama),
                wb.decode.get("speculative", draft_model=wb.tiny("llama", seed=1), k=3, schedule="heuristic"),
                wb.decode.get("prompt_lookup", schedule="constant", k=4),
                wb.decode.get("prompt_lookup", schedule="goodput"),
                wb.decode.get("cache_draft", draft_budget=32, schedule="goodput"),
                wb.decode.get("cache_draft", draft_budget=32, tiny_model=wb.tiny("llama", seed=1), k=5),
                wb.decode.get("cache_draft", draft_budget=32, tiny_model=tiny_llama, tiny_k=3)]
    for decoder in decoders:
        run = wb.generate(tiny_llama, prompt, cache=policy, decoder=decoder, max_new_tokens=40, ignore_eos=True)
        assert run.token_ids == greedy.token_ids, decoder.name
    self_drafted = wb.generate(tiny_llama, prompt, cache="full", decoder=decoders[1], max_new_tokens=40,
                               ignore_eos=True)
    # the prefill, the plain step that times greedy decoding, then the model drafting for itself: 4 + 1 tokens a pass
    assert self_drafted.trace.sizes["forward"] == 1 + 1 + 8


@pytest.mark.embedded
@pytest.mark.parametrize("cache", ["full", "snapkv"])
def test_prompt_lookup_equals_greedy_on_the_embedded_model_in_fewer_passes(embedded, cache):
    policy = wb.cache.get(cache) if cache == "full" else wb.cache.get(cache, budget=128)
    passage = ("The harbor town wakes before dawn. Fishing boats leave the pier one by one, their lanterns "
               "swinging, while the baker on Quay Street lights his ovens and the gulls gather on the roofs.")
    prompt = [{"role": "user", "content": f"Repeat this passage exactly:\n\n{passage}"}]
    greedy = wb.generate(embedded, prompt, cache=policy, max_new_tokens=40)
    lookup = wb.generate(embedded, prompt, cache=policy, decoder="prompt_lookup", max_new_tokens=40)
    assert lookup.token_ids == greedy.token_ids
    assert lookup.trace.sizes["forward"] < len(lookup.token_ids) / 2  # the copied text was accepted in long runs


def test_the_heuristic_schedule_grows_after_full_acceptance_and_shrinks_after_a_rejection(tiny_llama):
    lengths = []

    class Watched(wb.decode.SpeculativeDecoding):
        def draft(self, ctx, pending):
            lengths.append(self.length(ctx))
            return super().draft(ctx, pending)

    # drafting for itself, the model keeps every draft: 2, 4, 6, ...
    wb.generate(tiny_llama, "grow", decoder=Watched(draft_model=tiny_llama, k=2, schedule="heuristic"),
                max_new_tokens=30, ignore_eos=True)
    assert lengths[:4] == [2, 4, 6, 8]
    lengths.clear()
    # another model's drafts are rejected at once (random tiny models disagree): 5, 4, 3, 2, 1, 1
    wb.generate(tiny_llama, "shrink", decoder=Watched(draft_model=wb.tiny("llama", seed=1), k=5,
                                                      schedule="heuristic"), max_new_tokens=12, ignore_eos=True)
    assert lengths[:6] == [5, 4, 3, 2, 1, 1]


def test_the_ngram_index_finds_the_latest_earlier_occurrence():
    index = NgramIndex(2)
    tokens = [5, 6, 7, 5, 6, 8, 5, 6]
    index.extend(tokens)
    assert index.latest[(5, 6)] == 5  # after the second "5 6" (the tail's own "5 6" has nothing after it)
    assert index.latest[(6,)] == 5 and (6, 5) not in index.latest
    index.extend(tokens + [9])
    assert index.latest[(5, 6)] == 8


def test_bad_speculative_input_is_refused_in_one_line(tiny_llama):
    wider = wb.tiny("llama", vocab_size=384)
    for decoder, message in [(wb.decode.get("speculative", draft_model=wider), "another tokenizer or vocabulary"),
                             (wb.decode.get("speculative"), "needs draft_model="),
                             (wb.decode.get("cache_draft", tiny_model=wider), "the tiny model tiny-llama has another"),
                             (wb.decode.get("cache_draft", tiny_model=3), "'cache_draft' needs tiny_model=")]:
        with pytest.raises(wb.ParameterError, match=message) as caught:
            wb.generate(tiny_llama, "hi", decoder=decoder, max_new_tokens=4, ignore_eos=True)
        assert "\n" not in str(caught.value)
    by_name = wb.generate(tiny_llama, "hi", decoder=wb.decode.get("speculative", draft_model="tiny:llama"),
                          max_new_tokens=6, ignore_eos=True)  # the CLI's and the panel's way: a name to load
    assert by_name.token_ids == wb.generate(tiny_llama, "hi", max_new_tokens=6, ignore_eos=True).token_ids
    with pytest.raises(wb.ParameterError, match="'k' is 0; it must be >= 1"):
        wb.decode.get("prompt_lookup", k=0)


def test_a_speculative_runs_timings_count_its_steps_and_tokens(tiny_llama):
    run = wb.generate(tiny_llama, "time me", decoder=wb.decode.get("speculative", draft_model=tiny_llama),
                      max_new_tokens=22, ignore_eos=True, record=["entropy"])
    seconds = run.steps["step_seconds"].values
    timed = seconds[~torch.isnan(torch.from_numpy(seconds)).numpy()]
    # the prefill step, the plain step (this run's greedy time), then 4 steps of 5 tokens
    assert len(timed) == 1 + 1 + 4 and len(run.decode_seconds) == 5
    assert run.decode_tokens_per_s == pytest.approx(21 / timed[1:].sum())
    assert run.tokens_per_s == pytest.approx(22 / timed.sum())
    summary = run.summary()["entropy"]  # over the steps' first tokens; later tokens have no entropy of their own
    assert summary["mean"] == pytest.approx(float(run.steps["entropy"].mean(skipna=True)))
