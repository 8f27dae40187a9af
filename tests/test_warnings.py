"""Our own calls into torch and transformers raise no warnings (a new transformers release must not change what a
notebook prints): a default generation, an evicting cache, a session's phases and model.generate with a
workbench cache, all with warnings turned into errors."""

import warnings

import pytest

import workbench as wb


@pytest.fixture
def strict():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_default_generation_warns_about_nothing(tiny_llama, strict):
    wb.generate(tiny_llama, "no warnings, please", max_new_tokens=4, record=["entropy", "cache"])


def test_an_evicting_cache_and_every_phase_warn_about_nothing(tiny_llama, strict):
    wb.generate(tiny_llama, "no warnings, please " * 4, cache=wb.cache.get("h2o", budget=24, window=4),
                max_new_tokens=6, ignore_eos=True, record=["attention", "fidelity"])
    with wb.Session(tiny_llama, wb.cache.get("snapkv", budget=24, window=4)) as session:
        session.feed(tiny_llama.encode("no warnings, please " * 4), "prefill")
        session.feed([5], "decode")
        session.feed([6, 7], "verify")
        session.commit(1)
        session.feed([8, 9], "append")


def test_model_generate_with_a_workbench_cache_warns_about_nothing(tiny_llama, strict):
    ids = tiny_llama.encode("no warnings, please")
    cache = wb.cache.get("h2o", budget=24, window=4).build(tiny_llama)
    with wb.run.use_attention(tiny_llama, "sdpa", cache=cache):
        tiny_llama.hf.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=4, do_sample=False,
                               cache=cache, pad_token_id=0)


@pytest.mark.embedded
def test_the_embedded_model_warns_about_nothing(embedded, strict):
    wb.generate(embedded, [{"role": "user", "content": "Hi"}], max_new_tokens=4,
                cache=wb.cache.get("snapkv", budget=64), record=["entropy"])
