"""The generation loop: a session (model + attention variant + cache + router), a decoder driving the steps, and
the recorder.

It is deliberately plain: one prefill pass over the prompt, then one decoder step per iteration. The decoder's
`step(ctx)` returns one or more tokens (see workbench.decode.base); the loop checks them against the session's
positions, records the step, streams the text and stops at an end-of-sequence token or the length limit.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import torch

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench import decode as decode_family
from workbench import routers as router_family
from workbench.errors import ParameterError, PromptError, WorkbenchError
from workbench.models import Model
from workbench.models.model import Messages
from workbench.run.context import StepContext
from workbench.run.fidelity import dense_replay, kl_divergence
from workbench.run.prefix import PrefixCache
from workbench.run.result import Run, StepEvent
from workbench.run.session import Session, build_cache
from workbench.run.text import IncrementalText
from workbench.trace import Recorder, RecordSpec, build_dataset
from workbench.version import __version__


def generate(model: Model, prompt: str | Messages, *, attention: Any = "sdpa", cache: Any = "full",
             decoder: Any = "greedy", router: Any = "native",
             record: None | str | Iterable[str] | Mapping[str, Any] = None, max_new_tokens: int = 64,
             stream: Callable[[StepEvent], None] | None = None, progress: bool = False,
             ignore_eos: bool = False, prefixes: PrefixCache | None = None) -> Run:
    """Generate up to `max_new_tokens` tokens after `prompt` with the chosen components.

    prompt     -- raw text (used as is), or chat messages [{"role": "user", "content": ...}] that go through the
                  model's chat template
    attention, cache, decoder, router -- a registered name ("sdpa") or a built component
                  (workbench.cache.get("full")); see workbench.<family>.available()
    record     -- what the trace keeps: any of workbench.RECORDABLE ("entropy", "attention", "logits", "cache",
                  "fidelity"; nothing by default, and nothing recorded costs nothing; "fidelity" compares with
                  dense attention and a dense full-cache replay, which costs a dense recomputation per layer and
                  one extra forward pass)
    stream     -- called with a StepEvent as soon as each token is chosen (live text and plots)
    progress   -- show a progress bar over the new tokens
    ignore_eos -- keep generating past end-of-sequence tokens (benchmarks that need a fixed length)
    prefixes   -- a workbench.PrefixCache: start from the longest stored prefix of the prompt (its prefill is
                  skipped; `run.config["prefix_reused"]` says how many tokens) and store this run's snapshots
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
    peak_bytes, held_bytes, finish = 0, 0, "empty"
    if max_new_tokens > 0:
        stop_ids = set() if ignore_eos else model.eos_token_ids
        generated, (peak_bytes, held_bytes), finish, reused = _loop(model, prompt_ids, components, recorder,
                                                                       max_new_tokens, stop_ids, stream, progress,
                                                                       prefixes)
        config["prefix_reused"] = reused
    if "fidelity" in spec.names and generated:
        replay = dense_replay(model, prompt_ids, generated, recorder.evictions)
        recorder.along["kl_vs_dense"] = list(kl_divergence(replay.log_probs.cpu(),
                                                           torch.stack(recorder.log_probs)).numpy())
        dropped = replay.dropped_mass
        if dropped is None:  # nothing evicted: the dense model's attention all fell on held positions
            dropped = torch.zeros(len(generated), model.num_layers, model.num_heads).numpy()
        recorder.along["cache_dropped_mass"] = list(dropped)
    prompt_list = prompt_ids[0].tolist()
    if "cache_evicted_at" in recorder.enabled:
        recorder.eviction_log(model.num_kv_heads, len(prompt_list) + len(generated))
    config.update(finish_reason=finish, prompt_tokens=len(prompt_list))
    trace = build_dataset(recorder, prompt_tokens=model.token_strings(prompt_list),
                          tokens=model.token_strings(generated), token_ids=generated,
                          num_kv_heads=model.num_kv_heads, vocab_size=model.text_config.vocab_size, attrs=config)
    # one time per step: the later tokens of a multi-token step (speculative decoding) record a missing value
    step_seconds = [s for s in recorder.along.get("step_seconds", []) if s == s]
    return Run(text=model.decode(generated), token_ids=generated, prompt_ids=prompt_list,
               prefill_seconds=step_seconds[0] if step_seconds else 0.0, decode_seconds=step_seconds[1:],
               peak_cache_bytes=peak_bytes, held_cache_bytes=held_bytes, finish_reason=finish, trace=trace, config=config)


def _loop(model, prompt_ids, components, recorder, max_new_tokens, stop_ids, stream, progress, prefixes):
    decoder = components["decoder"]
    kv = build_cache(model, components["cache"])
    kv.record_events = recorder.wants_cache_events
    if recorder.measures_quant_error and kv.quantizes:
        kv.measure_quant_error()
    observer = recorder if recorder.observes_attention or recorder.observes_routing or recorder.observes_layers \
        else None
    rng = _generator(decoder, model.device)
    bar = _progress_bar(max_new_tokens) if progress else None
    text = IncrementalText(model.decode)
    generated, finish = [], "length"
    prompt = prompt_ids[0].tolist()
    started = time.perf_counter()  # step 0's time includes the prefill (or the rest of the prompt after a reused prefix)
    session = Session(model, kv, components["attention"], observer=observer, router=components["router"])
    reuse = prefixes.reuse(session, prompt, observer) if prefixes is not None else None
    if reuse is not None:
        session = reuse.session
        session.cache.record_events = recorder.wants_cache_events
    with session:
        session.listeners.append(recorder.end_forward)
        if reuse is None:
            logits = session.feed(prompt_ids, "prefill")[-1]
        else:
            logits = session.feed(prompt_ids[:, reuse.tokens:], "append")[-1]
        pending: list[int] = []
        sequence, state = prompt_ids[0].tolist(), {}  # read by decoders through ctx.tokens / ctx.state
        while len(generated) < max_new_tokens:
            ctx = StepContext(session, rng, pending, logits, recorder, sequence, state,
                              remaining=max_new_tokens - len(generated), stop_ids=stop_ids)
            tokens = decoder.step(ctx)
            if not ctx.logits_seen and not ctx.pending:
                raise WorkbenchError(f"decoder '{decoder.name}' fed the pending token itself but did not say which "
                                     "logits chose its first token: call ctx.chose_from(logits)")
            first_logits = ctx.logits  # what chose the step's first token
            _check_step(decoder, session, tokens, len(prompt_ids[0]) + len(generated))
            seconds = time.perf_counter() - started  # int(...) in the decoder waited for the device
            records = recorder.end_step(first_logits, ctx.entropy if "entropy" in recorder.spec.names else None,
                                        kv, seconds, ctx.logits_forward,
                                        tokens=min(len(tokens), max_new_tokens - len(generated)))
            for token_id in tokens[:max_new_tokens - len(generated)]:
                generated.append(token_id)
                sequence.append(token_id)
                finished = token_id in stop_ids or len(generated) == max_new_tokens
                if token_id in stop_ids:
                    finish = "eos"
                if bar is not None:
                    bar.update(1)
                if stream is not None:
                    piece = text.add(token_id, final=finished)
                    stream(StepEvent(len(generated) - 1, token_id, model.token_strings([token_id])[0], piece,
                                     records, finished))
                if finished:
                    break
            if finish == "eos":
                break
            pending, logits = [generated[-1]], None
            started = time.perf_counter()
        if prefixes is not None:
            prefixes.store(session, prompt + generated[:-1])  # the next turn's prompt starts with this run
    if bar is not None:
        bar.close()
    return generated, (session.peak_bytes, session.held_peak_bytes), finish, reuse.tokens if reuse else 0


def _check_step(decoder, session, tokens, before: int) -> None:
    """A step returns its tokens with all but the last fed: the session must be exactly there."""
    if not tokens or not all(isinstance(t, int) for t in tokens):
        raise WorkbenchError(f"decoder '{decoder.name}' step returned {tokens!r}; it must return a non-empty list "
                             "of token ids (ints)")
    if session.position != before + len(tokens) - 1 or session.committed != session.position:
        raise WorkbenchError(f"decoder '{decoder.name}' left the session at position {session.position} "
                             f"({session.position - session.committed} provisional) after returning "
                             f"{len(tokens)} tokens at position {before}: all but the last token must be fed and "
                             "committed")


def _generator(decoder, device) -> torch.Generator:
    """The run's random generator, seeded by the decoder's `seed` parameter when it has one."""
    generator = torch.Generator(device=device)
    seed = getattr(decoder, "seed", None)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


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

    config: dict[str, Any] = {"model": model.name, "prompt": prompt, "max_new_tokens": max_new_tokens,
                              "record": sorted(spec.names)}
    for family, component in components.items():
        config[family] = component.name
        config[f"{family}_params"] = component.params()
    config.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                  workbench_version=__version__, torch_version=torch.__version__,
                  transformers_version=transformers.__version__)
    return config


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="tok")
