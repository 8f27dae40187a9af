"""workbench.eval: the generators make what they claim, the loops score what an independent computation scores,
and the harness returns a policy x budget x task x seed dataset (plumbing on the tiny random model)."""

import json
import math

import pytest
import torch
import xarray as xr

import workbench as wb
from workbench.errors import ParameterError, UnknownComponentError
from workbench.eval import (MultiKey, MultiTurn, Needle, Passkey, Perplexity, converse, evaluate, perplexity,
                            render, table)
from workbench.eval.__main__ import main as cli_main
from workbench.eval.prefill import PrefillRecord, prefill
from workbench.eval.tasks import encode


# MPCache's decode-time cluster selection saves compute, not bytes, and ignores the budget: to cover everything it
# must also select every cluster (its default selects half of them).
COVERING = {"mpcache": {"top_coarse": 8, "top_fine": 32},
            "shadowkv": {"rank": 4096}}  # its keys are a truncated SVD: a rank above the key width keeps them
# lazy_eviction keeps the prompt until it has observed `every` steps: with every=1 it evicts at the first one;
# knorm and d2o leave layers 0 and 1 whole by default, which is all of the tiny model
SMALL = {"lazy_eviction": {"every": 1}, "knorm": {"full_layers": ""}, "d2o": {"full_layers": ""}}


def budgeted_policies():
    return [name for name in wb.cache.available()
            if any(spec.name == "budget" for spec in wb.cache.registry.component_class(name).parameters())]


# -- generators ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [Passkey(length=500), Passkey(length=800, depth=(0.2, 0.8)),
                                  Needle(length=700), MultiKey(length=800), MultiTurn(length=900, keys=3),
                                  Passkey(length=600, filler="text")])
def test_retrieval_prompts_have_the_requested_length(tiny_llama, task):
    for seed in range(3):
        sample = task.make(tiny_llama, seed)
        measured = len(encode(tiny_llama.tokenizer, render(tiny_llama.tokenizer, sample.messages())))
        assert sample.tokens == measured
        assert abs(measured - task.length) <= task.tolerance


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_passkey_sits_at_the_requested_depth(tiny_llama, depth):
    tok = tiny_llama.tokenizer
    for seed in range(2):
        sample = Passkey(length=900, depth=depth).make(tiny_llama, seed)
        key = sample.answers[0]
        needle = f"The pass key is {key}."
        assert sample.context.count(needle) == 1 and key in sample.context
        where = sample.context.index(needle)
        measured = len(encode(tok, sample.context[:where])) / len(encode(tok, sample.context))
        assert measured == pytest.approx(depth, abs=0.05)
        assert sample.depths[0] == pytest.approx(measured, abs=0.02)


def test_samples_are_reproducible_and_seeds_differ(tiny_llama):
    for task in (Passkey(length=500), Needle(length=600), MultiTurn(length=800), Perplexity(context=200)):
        a, b, c = task.make(tiny_llama, 7), task.make(tiny_llama, 7), task.make(tiny_llama, 8)
        assert a == b
        assert a != c


def test_multikey_answers_are_distinct_and_each_is_in_the_context_once(tiny_llama):
    for seed in range(3):
        sample = MultiTurn(length=900, keys=4).make(tiny_llama, seed)
        assert len(sample.answers) == len(sample.questions) == 4 == len(set(sample.answers))
        for question, answer in zip(sample.questions, sample.answers):
            label = question.split("for the ")[1].split(" door")[0]
            assert sample.context.count(answer) == 1
            assert f"The pass key for the {label} door is {answer}." in sample.context
        assert sorted(sample.depths) == sample.depths and sample.depths[0] < 0.2 and sample.depths[-1] > 0.8
        single = MultiKey(length=900, keys=4).make(tiny_llama, seed)
        assert len(single.questions) == 1 and len(single.context.split("The pass key for the")) == 5


def test_perplexity_windows_are_consecutive_text_tokens(tiny_llama):
    task = Perplexity(context=300, continuation=40)
    sample = task.make(tiny_llama, 1)
    assert (len(sample.context_ids), len(sample.continuation_ids)) == (300, 40)
    text_ids = encode(tiny_llama.tokenizer, wb.eval.data.read_text())
    assert text_ids[sample.offset:sample.offset + 340] == sample.context_ids + sample.continuation_ids


def test_bad_task_parameters_are_refused(tiny_llama):
    with pytest.raises(ParameterError, match="too short"):
        MultiKey(length=100, keys=8).make(tiny_llama, 0)
    with pytest.raises(ParameterError, match="filler"):
        Passkey(filler="nonsense")
    with pytest.raises(ParameterError, match="depth"):
        Passkey(length=500, depth=1.5).make(tiny_llama, 0)
    with pytest.raises(ParameterError, match="fewer than"):
        Perplexity(context=10**6).make(tiny_llama, 0)


# -- the loops -------------------------------------------------------------------------------------------------
def test_full_cache_perplexity_equals_a_plain_forward(tiny_llama):
    sample = Perplexity(context=120, continuation=24).make(tiny_llama, 0)
    ids = torch.tensor([sample.context_ids + sample.continuation_ids])
    with torch.inference_mode():
        logits = tiny_llama.hf(input_ids=ids).logits[0].double()
    n = len(sample.context_ids)
    nll = torch.nn.functional.cross_entropy(logits[n - 1:-1], ids[0, n:], reduction="sum").item()
    for chunk in (1, 5):
        result = perplexity(tiny_llama, sample.context_ids, sample.continuation_ids, "full", chunk=chunk)
        assert result.tokens == 24
        assert result.nll == pytest.approx(nll, rel=1e-4)
        assert result.perplexity == pytest.approx(math.exp(nll / 24), rel=1e-4)


@pytest.mark.parametrize("policy", budgeted_policies())
def test_a_budget_covering_everything_gives_the_full_cache_perplexity(tiny_llama, policy):
    sample = Perplexity(context=100, continuation=12).make(tiny_llama, 0)
    full = perplexity(tiny_llama, sample.context_ids, sample.continuation_ids, "full")
    roomy = perplexity(tiny_llama, sample.context_ids, sample.continuation_ids,
                       wb.cache.get(policy, budget=200, **COVERING.get(policy, {})))
    assert roomy.nll == pytest.approx(full.nll, rel=1e-4)
    small = perplexity(tiny_llama, sample.context_ids, sample.continuation_ids,
                       wb.cache.get(policy, budget=48, **SMALL.get(policy, {})))
    assert small.held_cache_bytes < full.held_cache_bytes


# the prefill's attention reads what the cache stores (xquant: keys and values rematerialized from X, ~1e-6 off):
# replay refuses, a real one runs
READS_ITS_OWN_CODES = {"fp8", "xquant"}


@pytest.mark.parametrize("policy", wb.cache.available())
def test_a_replayed_prefill_leaves_the_cache_a_real_prefill_leaves(tiny_llama, policy):
    sample = Perplexity(context=120, continuation=6).make(tiny_llama, 0)
    record = PrefillRecord.capture(tiny_llama, sample.context_ids, wb.attention.get("sdpa"))
    params = {"budget": 40} if policy in budgeted_policies() else {}
    caches = []
    for replay in (False, True, True):  # the second replay reuses the statistics the first one computed
        with wb.Session(tiny_llama, wb.cache.get(policy, **params)) as session:
            logits, replayed = prefill(session, sample.context_ids, record if replay else None)
            assert replayed == (replay and policy not in READS_ITS_OWN_CODES)
            held = [[p.tolist() for p in session.cache.positions(layer)] for layer in range(tiny_llama.num_layers)]
            caches.append((logits, held, session.cache.nbytes(),
                           session.feed(sample.continuation_ids[:3], "append")))
    (real_logits, real_held, real_bytes, real_next), *replays = caches
    for logits, held, nbytes, after in replays:
        assert torch.allclose(logits, real_logits, atol=1e-5, rtol=1e-5)
        assert held == real_held and nbytes == real_bytes
        assert torch.allclose(after, real_next, atol=1e-4, rtol=1e-4)


def test_a_single_turn_reply_matches_workbench_generate(tiny_llama):
    sample = Passkey(length=400).make(tiny_llama, 0)
    for cache in ("full", wb.cache.get("snapkv", budget=64)):
        talk = converse(tiny_llama, sample, cache, max_new_tokens=6)
        run = wb.generate(tiny_llama, sample.messages(), cache=cache, max_new_tokens=6)
        assert talk.reply_ids[0] == run.token_ids
        assert talk.prompt_tokens == len(run.prompt_ids)


# -- the harness -------------------------------------------------------------------------------------------------
def test_evaluate_returns_policy_budget_task_seed(tiny_llama, tmp_path):
    tasks = [Passkey(length=400), MultiTurn(length=500, keys=2), Perplexity(context=150, continuation=8)]
    ds = evaluate(tiny_llama, {"full": [], "snapkv": [64, 128], "streaming_llm": [64]}, tasks, seeds=2,
                  progress=False, max_new_tokens=3)
    assert dict(ds.sizes) == {"policy": 3, "budget": 2, "task": 3, "seed": 2}
    assert list(ds.policy.values) == ["full", "snapkv", "streaming_llm"]
    assert list(ds.budget.values) == [64, 128] and list(ds.task.values) == ["passkey", "multiturn", "perplexity"]
    assert list(ds.seed.values) == [0, 1]
    # full does not depend on the budget: one run fills every column; streaming_llm never ran at 128
    peak = ds.peak_cache_bytes
    assert (peak.sel(policy="full", budget=64) == peak.sel(policy="full", budget=128)).all()
    assert peak.sel(policy="streaming_llm", budget=128).isnull().all()
    assert (peak.sel(policy="snapkv", budget=64) < peak.sel(policy="full", budget=64)).all()
    retrieval, ppl = ds.sel(task=["passkey", "multiturn"]), ds.sel(task="perplexity")
    assert ppl.accuracy.isnull().all() and retrieval.perplexity.isnull().all()
    for seed in (0, 1):  # the full cache's perplexity is the unmodified model's, teacher-forced
        sample = Perplexity(context=150, continuation=8).make(tiny_llama, seed)
        ids = torch.tensor([sample.context_ids + sample.continuation_ids])
        with torch.inference_mode():
            log_probs = torch.log_softmax(tiny_llama.hf(ids).logits[0, len(sample.context_ids) - 1:-1].float(), -1)
        nll = -log_probs.gather(1, torch.tensor(sample.continuation_ids)[:, None]).mean()
        for budget in (64, 128):
            assert float(ppl.perplexity.sel(policy="full", budget=budget, seed=seed)) == pytest.approx(
                float(nll.exp()), rel=1e-4)
    valid = retrieval.sel(policy=["full", "snapkv"])
    assert (valid.accuracy == valid.correct / valid.questions).all()
    assert (ds.questions.sel(policy="full", task="multiturn") == 2).all()
    assert json.loads(ds.attrs["budget_free_policies"]) == ["full"] and json.loads(ds.attrs["errors"]) == []
    assert [t["name"] for t in json.loads(ds.attrs["tasks"])] == ["passkey", "multiturn", "perplexity"]
    path = tmp_path / "results.nc"
    ds.to_netcdf(path)
    with xr.open_dataset(path) as back:
        assert back.attrs["model"] == "tiny-llama" and back.perplexity.equals(ds.perplexity)
    assert "passkey: accuracy" in table(ds) and "perplexity: perplexity" in table(ds)


def test_replayed_and_real_prefills_give_the_same_results(tiny_llama):
    tasks = [Passkey(length=400), MultiTurn(length=500, keys=2), Perplexity(context=150, continuation=8)]
    grid = {"full": [], "snapkv": [64], "h2o": [64], "tova": [64]}
    replayed, real = (evaluate(tiny_llama, grid, tasks, seeds=[3], progress=False, max_new_tokens=3, prefill=mode)
                      for mode in ("replay", "run"))
    assert (replayed.replayed == 1).all() and (real.replayed == 0).all()
    assert (replayed.reply == real.reply).all() and replayed.peak_cache_bytes.equals(real.peak_cache_bytes)
    xr.testing.assert_allclose(replayed.nll, real.nll, rtol=1e-5)


def test_evaluate_refuses_unknown_policies_and_records_failures(tiny_llama):
    with pytest.raises(UnknownComponentError, match="registered"):
        evaluate(tiny_llama, {"no_such_cache": [64]}, [Perplexity(context=50, continuation=4)], progress=False)
    with pytest.raises(ParameterError, match="distinct"):
        evaluate(tiny_llama, ["full"], [Passkey(length=400), Passkey(length=500)], progress=False)
    # a budget the policy rejects: "record" leaves NaN and says why
    ds = evaluate(tiny_llama, [("full", {}), ("snapkv", {"budget": 8})], [Perplexity(context=50, continuation=4)],
                  progress=False, errors="record")  # below its observation window of 32
    assert ds.perplexity.sel(policy="snapkv").isnull().all() and ds.perplexity.sel(policy="full").notnull().all()
    assert "budget 8" in json.loads(ds.attrs["errors"])[0]["error"]


def test_a_bug_is_never_a_nan_cell(tiny_llama, monkeypatch):
    """errors="record" records configurations that cannot run; a programming error propagates."""
    def broken(*args, **kwargs):
        raise TypeError("a bug in the loop")

    monkeypatch.setattr("workbench.eval.harness.perplexity", broken)
    with pytest.raises(TypeError, match="a bug in the loop"):
        evaluate(tiny_llama, ["full"], [Perplexity(context=50, continuation=4)], progress=False, errors="record")


def test_the_command_line_prints_a_table_and_saves(tmp_path, capsys):
    out = tmp_path / "r.nc"
    code = cli_main(["--model", "tiny:llama", "--policies", "full,streaming_llm", "--budgets", "64",
                     "--context", "400", "--continuation", "8", "--seeds", "1", "--max-new-tokens", "2",
                     "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "streaming_llm" in printed and "passkey: accuracy" in printed and "perplexity: perplexity" in printed


# -- the embedded model ------------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_the_embedded_model_retrieves_a_passkey_with_the_full_cache(embedded):
    sample = Passkey(length=500, depth=0.5).make(embedded, 0)
    assert abs(sample.tokens - 500) <= 16
    talk = converse(embedded, sample, "full", max_new_tokens=12)
    assert talk.correct == [True], talk.replies


@pytest.mark.embedded
def test_a_later_turn_on_the_full_cache_answers_as_a_fresh_prompt_would(embedded):
    sample = MultiTurn(length=300, keys=2).make(embedded, 1)
    talk = converse(embedded, sample, "full", max_new_tokens=12)
    first_reply = embedded.decode(talk.reply_ids[0])  # as the conversation rendered it (unstripped)
    fresh = wb.generate(embedded, sample.messages([first_reply]), max_new_tokens=12)
    assert talk.replies[1] == fresh.text.strip()
