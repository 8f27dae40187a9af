"""The generation loop: model + attention variant + cache policy + decoder + router + recorder.

It is deliberately plain: one forward pass over the prompt (prefill), then one pass per new token, each with
explicit positions so caches that evict tokens still give every token its true RoPE position.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import torch

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench import decode as decode_family
from workbench import routers as router_family
from workbench.attention import use_attention
from workbench.errors import ParameterError, PromptError, WorkbenchError
from workbench.models import Model
from workbench.models.model import Messages
from workbench.run.fidelity import dense_replay, kl_divergence
from workbench.run.result import Run, StepEvent
from workbench.trace import Recorder, RecordSpec, build_dataset


def generate(model: Model, prompt: str | Messages, *, attention: Any = "sdpa", cache: Any = "full",
             decoder: Any = "greedy", router: Any = "native",
             record: None | str | Iterable[str] | Mapping[str, Any] = None, max_new_tokens: int = 64,
             stream: Callable[[StepEvent], None] | None = None, progress: bool = False,
             ignore_eos: bool = False) -> Run:
    """Generate up to `max_new_tokens` tokens after `prompt` with the chosen components.

    prompt     -- raw text (used as is), or chat messages [{"role": "user", "content": ...}] that go through the
                  model's chat template
    attention, cache, decoder, router -- a registered name ("sdpa") or a built component
                  (workbench.cache.get("full")); see workbench.<family>.available()
    record     -- what the trace keeps: any of "entropy", "attention", "logits", "cache", "fidelity" (nothing by
                  default; nothing recorded costs nothing; "fidelity" compares with dense attention and a dense
                  full-cache replay, which costs a dense recomputation per layer and one extra forward pass)
    stream     -- called with a StepEvent as soon as each token is chosen (live text and plots)
    progress   -- show a progress bar over the new tokens
    ignore_eos -- keep generating past end-of-sequence tokens (benchmarks that need a fixed length)
    """
    if not isinstance(model, Model):
        raise WorkbenchError(f"generate needs a workbench Model (workbench.load(), workbench.tiny() or "
                             f"workbench.wrap(hf_model, tokenizer)), got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ParameterError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    components = {
        "attention": attention_family.get(attention),
        "cache": cache_family.get(cache),
        "decoder": decode_family.get(decoder),
        "router": router_family.get(router),
    }
    spec = RecordSpec.parse(record)
    recorder = Recorder(spec, model.num_layers, model.num_heads)
    prompt_ids = _encode(model, prompt, max_new_tokens)
    config = _config(model, prompt, components, spec, max_new_tokens)
    config["ignore_eos"] = ignore_eos

    generated: list[int] = []
    step_seconds: list[float] = []
    peak_bytes, finish = 0, "empty"
    if max_new_tokens > 0:
        stop_ids = set() if ignore_eos else model.eos_token_ids
        generated, step_seconds, peak_bytes, finish = _loop(model, prompt_ids, components, recorder,
                                                            max_new_tokens, stop_ids, stream, progress)
    if "fidelity" in spec.names and generated:
        replay = dense_replay(model, prompt_ids, generated, recorder.evictions)
        recorder.kl_vs_dense = kl_divergence(replay.log_probs.cpu(), torch.stack(recorder.steps["log_probs"])).numpy()
        recorder.cache_dropped_mass = replay.dropped_mass
    prompt_list = prompt_ids[0].tolist()
    config.update(finish_reason=finish, prompt_tokens=len(prompt_list))
    trace = build_dataset(recorder, prompt_tokens=model.token_strings(prompt_list),
                          tokens=model.token_strings(generated), token_ids=generated,
                          num_kv_heads=model.num_kv_heads, vocab_size=model.text_config.vocab_size, attrs=config)
    return Run(text=model.decode(generated), token_ids=generated, prompt_ids=prompt_list,
               prefill_seconds=step_seconds[0] if step_seconds else 0.0, decode_seconds=step_seconds[1:],
               peak_cache_bytes=peak_bytes, finish_reason=finish, trace=trace, config=config)


def _loop(model, prompt_ids, components, recorder, max_new_tokens, stop_ids, stream, progress):
    hf, device = model.hf, model.device
    keep_last = model.keep_logits(1)
    kv = components["cache"].build(model)
    decoder = components["decoder"]
    decoder.start(device)
    observer = recorder if recorder.observes_attention else None
    bar = _progress_bar(max_new_tokens) if progress else None
    generated, step_seconds, peak_bytes, finish = [], [], 0, "length"
    shown = ""
    inputs, position = prompt_ids, 0
    with torch.inference_mode(), use_attention(hf, components["attention"], observer, kv), \
            components["router"].attached(model):
        for step in range(max_new_tokens):
            started = time.perf_counter()
            positions = torch.arange(position, position + inputs.shape[1], device=device)[None]
            kv.see_tokens(inputs)
            logits = hf(input_ids=inputs, **{model.cache_keyword: kv}, position_ids=positions, use_cache=True,
                        **keep_last).logits[0, -1].float()
            token = decoder.choose(logits[None])[0]
            token_id = int(token)  # waits for the device: the step's time is complete here
            seconds = time.perf_counter() - started
            records = recorder.end_step(logits, kv, seconds, prefill=step == 0)
            peak_bytes = max(peak_bytes, kv.nbytes())
            generated.append(token_id)
            step_seconds.append(seconds)
            position += inputs.shape[1]
            inputs = token.view(1, 1)
            finished = token_id in stop_ids or step == max_new_tokens - 1
            if token_id in stop_ids:
                finish = "eos"
            if bar is not None:
                bar.update(1)
            if stream is not None:
                text = model.decode(generated)
                # hold back a partial multi-byte character until the token that completes it
                piece = "" if text.endswith("\ufffd") and not finished else text[len(shown):]
                shown += piece
                stream(StepEvent(step, token_id, model.token_strings([token_id])[0], piece, records, finished))
            if finished:
                break
    if bar is not None:
        bar.close()
    return generated, step_seconds, peak_bytes, finish


def _encode(model: Model, prompt, max_new_tokens: int) -> torch.Tensor:
    if isinstance(prompt, str) and not prompt.strip():
        raise PromptError("the prompt is empty; give some text, or chat messages as a list of "
                          "{'role': ..., 'content': ...} dicts")
    ids = model.encode(prompt)
    if ids.shape[1] == 0:
        raise PromptError("the prompt encodes to no tokens")
    limit = model.max_positions
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        if ids.shape[1] >= limit:
            raise PromptError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit} "
                              "tokens; shorten it")
        raise PromptError(f"the prompt is {ids.shape[1]} tokens and max_new_tokens is {max_new_tokens}: together "
                          f"they exceed the model's context of {limit} tokens; use max_new_tokens <= "
                          f"{limit - ids.shape[1]}")
    return ids


def _config(model: Model, prompt, components, spec: RecordSpec, max_new_tokens: int) -> dict[str, Any]:
    import transformers

    import workbench

    config: dict[str, Any] = {"model": model.name, "prompt": prompt, "max_new_tokens": max_new_tokens,
                              "record": sorted(spec.names)}
    for family, component in components.items():
        config[family] = component.name
        config[f"{family}_params"] = component.params()
    config.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                  workbench_version=workbench.__version__, torch_version=torch.__version__,
                  transformers_version=transformers.__version__)
    return config


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="tok")
