"""Two runs on one model at the same time each get their own components and their own correct results: the
binding travels with every forward pass, never in shared state."""

import threading

import workbench as wb
from workbench.widgets import Workbench

PROMPT = "Threads share one model but nothing else. "


def test_two_runs_interleaved_token_by_token_on_one_model_match_their_solo_runs(tiny_llama):
    configs = {"a": dict(attention="eager", cache=wb.cache.get("h2o", budget=24, window=4),
                         record=["entropy", "cache"]),
               "b": dict(attention="flash", cache="full", decoder=wb.decode.get("sample", seed=1),
                         record=["entropy"])}
    solo = {name: wb.generate(tiny_llama, PROMPT, max_new_tokens=12, ignore_eos=True, **config)
            for name, config in configs.items()}
    turns = {"a": threading.Event(), "b": threading.Event()}
    other = {"a": "b", "b": "a"}

    def ping_pong(name):  # after each token, hand over to the other run and wait for its token
        def on_step(event):
            turns[other[name]].set()
            if not event.finished:
                turns[name].wait(timeout=10)
                turns[name].clear()
        return on_step

    results = {}

    def work(name):
        results[name] = wb.generate(tiny_llama, PROMPT, max_new_tokens=12, ignore_eos=True,
                                    stream=ping_pong(name), **configs[name])

    thread = threading.Thread(target=work, args=("a",))
    thread.start()
    work("b")
    thread.join(timeout=60)
    for name in configs:
        assert results[name].token_ids == solo[name].token_ids, name
        for variable in ("entropy", "attention_entropy"):
            assert (results[name].steps[variable].values == solo[name].steps[variable].values).all()
    assert (results["a"].steps["cache_tokens"].values == solo["a"].steps["cache_tokens"].values).all()
    assert tiny_llama.hf.config._attn_implementation == "sdpa"  # restored once both runs were done


def test_the_panel_in_its_thread_and_a_cell_on_the_same_model(tiny_llama):
    panel = Workbench(tiny_llama, PROMPT, chat=False, max_new_tokens=24, cache="streaming_llm")
    panel.ignore_eos.value = True
    panel.run()
    cell = wb.generate(tiny_llama, PROMPT, attention="eager", cache=wb.cache.get("tova", budget=20, window=2),
                       max_new_tokens=24, ignore_eos=True)  # while the panel's thread generates
    panel.wait(timeout=120)
    panel_solo = wb.generate(tiny_llama, PROMPT, cache="streaming_llm", max_new_tokens=24, ignore_eos=True,
                             record=[name for name, box in panel.record.items() if box.value])
    cell_solo = wb.generate(tiny_llama, PROMPT, attention="eager", cache=wb.cache.get("tova", budget=20, window=2),
                            max_new_tokens=24, ignore_eos=True)
    assert panel.runs[0].token_ids == panel_solo.token_ids
    assert cell.token_ids == cell_solo.token_ids
