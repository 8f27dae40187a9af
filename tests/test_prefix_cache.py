"""Prefix sharing (issue 12, item 5): a run that starts from a stored prefix skips that prefix's prefill (its first
forward pass feeds only the rest, counted from the trace) and gives the tokens a full prefill gives (the same run
without a PrefixCache is the reference); the reused length is the longest common prefix computed here."""

import pytest

import workbench as wb
from workbench.errors import ParameterError

SYSTEM = {"role": "system", "content": "You answer questions about the harbor town in one or two sentences."}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def first_pass_tokens(run) -> int:
    return int(run.trace["forward_tokens"].values.ravel()[0])


def test_a_second_chat_turn_feeds_only_what_follows_the_first_and_gives_the_same_tokens(embedded):
    prefixes = wb.PrefixCache()
    chat = [SYSTEM, {"role": "user", "content": "Describe the harbor at dawn."}]
    first = wb.generate(embedded, chat, max_new_tokens=12, prefixes=prefixes)
    assert first.config["prefix_reused"] == 0 and first_pass_tokens(first) == len(first.prompt_ids)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And at night?"}]
    reference = wb.generate(embedded, chat, max_new_tokens=12)
    second = wb.generate(embedded, chat, max_new_tokens=12, prefixes=prefixes)
    assert second.token_ids == reference.token_ids
    shared = common_prefix(first.prompt_ids + first.token_ids[:-1], second.prompt_ids)
    assert second.config["prefix_reused"] == min(shared, len(second.prompt_ids) - 1) > len(first.prompt_ids) // 2
    assert first_pass_tokens(second) == len(second.prompt_ids) - second.config["prefix_reused"]
    assert list(second.trace["forward_phase"].values.ravel()[:1]) == ["append"]


def test_a_full_cache_reuses_a_shared_system_prompt_cut_from_a_longer_snapshot(embedded):
    """RadixAttention's case: two questions after one system prompt; the stored run is cut back to what they share."""
    prefixes = wb.PrefixCache()
    one = wb.generate(embedded, [SYSTEM, {"role": "user", "content": "Who lives there?"}], max_new_tokens=6,
                      prefixes=prefixes)
    question = [SYSTEM, {"role": "user", "content": "What do they eat?"}]
    reference = wb.generate(embedded, question, max_new_tokens=6)
    two = wb.generate(embedded, question, max_new_tokens=6, prefixes=prefixes)
    assert two.token_ids == reference.token_ids
    assert two.config["prefix_reused"] == common_prefix(one.prompt_ids, two.prompt_ids) > 10
    again = wb.generate(embedded, question, max_new_tokens=6, prefixes=prefixes)  # the same prompt: all but one
    assert again.config["prefix_reused"] == len(two.prompt_ids) - 1
    assert again.token_ids == reference.token_ids
    assert prefixes.hits == 2 and prefixes.misses == 1


def test_a_compressing_cache_reuses_exact_prefixes_only_and_continues_as_one_conversation(embedded):
    """snapkv's snapshot holds what it kept of the first turn: a second turn starts from it exactly as the same
    session continuing would (the reference: one session fed turn by turn); a different question after the same
    system prompt is not cut from it (the cache cannot forget what it compressed), so it is a miss."""
    policy = wb.cache.get("snapkv", budget=40)
    prefixes = wb.PrefixCache()
    chat = [SYSTEM, {"role": "user", "content": "Describe the harbor at dawn, with the boats and the gulls."}]
    first = wb.generate(embedded, chat, cache=policy, max_new_tokens=8, ignore_eos=True, prefixes=prefixes)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And at night?"}]
    second = wb.generate(embedded, chat, cache=policy, max_new_tokens=8, prefixes=prefixes)
    reused = second.config["prefix_reused"]
    assert reused == len(first.prompt_ids) + len(first.token_ids) - 1  # the whole first run, as fed

    with wb.Session(embedded, policy, "sdpa") as session:  # the reference: one cache across both turns
        session.feed(first.prompt_ids, "prefill")
        for token in first.token_ids[:-1]:
            session.feed([token], "decode")
        logits = session.feed(second.prompt_ids[reused:], "append")[-1]
        tokens = [int(logits.argmax())]
        for _ in range(len(second.token_ids) - 1):
            tokens.append(int(session.feed([tokens[-1]], "decode")[-1].argmax()))
    assert second.token_ids == tokens
    other = wb.generate(embedded, [SYSTEM, {"role": "user", "content": "Who lives there?"}], cache=policy,
                        max_new_tokens=4, prefixes=prefixes)
    assert other.config["prefix_reused"] == 0


def test_snapshots_are_per_configuration_and_the_oldest_go_beyond_capacity(embedded):
    prefixes = wb.PrefixCache(capacity=2)
    prompts = ["Harbor towns wake early.", "Lighthouses stand on the rocks.", "Markets open at six."]  # nothing shared
    for prompt in prompts:
        wb.generate(embedded, prompt, max_new_tokens=3, prefixes=prefixes)
    assert len(prefixes) == 2 and prefixes.hits == 0
    assert wb.generate(embedded, prompts[0], max_new_tokens=3, prefixes=prefixes).config["prefix_reused"] == 0
    assert wb.generate(embedded, prompts[2], max_new_tokens=3, prefixes=prefixes).config["prefix_reused"] > 0
    other = wb.generate(embedded, prompts[2], attention="eager", max_new_tokens=3, prefixes=prefixes)
    assert other.config["prefix_reused"] == 0  # another attention variant never reuses sdpa's snapshots
    with pytest.raises(ParameterError, match="capacity"):
        wb.PrefixCache(capacity=0)
