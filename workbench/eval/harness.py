"""`evaluate`: score cache configurations on tasks and seeds; the result is an xarray.Dataset.

    ds = evaluate(model, {"snapkv": [64, 128, 256], "full": []}, tasks=[Passkey(length=2000), Perplexity()],
                  seeds=3)
    ds.accuracy.sel(task="passkey").mean("seed")        # policy x budget
    ds.to_netcdf("results.nc")                          # attrs hold the configuration (JSON strings)

Dimensions: policy x budget x task x seed. Variables: accuracy, correct, questions (retrieval tasks; NaN for
perplexity tasks), perplexity and nll (perplexity tasks; NaN otherwise), peak_cache_bytes (at any moment, the
uncompressed prefill included), held_cache_bytes (after a forward pass), context_tokens, seconds, replayed (1 where
the prefill was replayed, see workbench.eval.prefill) and reply (the model's replies, " | "-joined across turns;
"" for perplexity tasks).

Caches are given as a grid {policy: [budgets]} or a list of entries: a name, (name, {params}), or a built policy.
Policies without a `budget` parameter (`full`, say) do not depend on it: they run once per task and seed and
their results fill every budget column. A policy with parameters besides the budget is labelled with them
("snapkv(window=64)"). Policies are looked up in `workbench.cache` at call time, so any registered name works.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import xarray as xr

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench.errors import ParameterError, WorkbenchError
from workbench.eval.multiturn import converse, prompt_ids
from workbench.eval.perplexity import perplexity
from workbench.eval.prefill import PrefillRecord
from workbench.eval.tasks import Passkey, Perplexity, Task

NO_BUDGET = 0  # the budget coordinate when no configuration has one


@dataclass
class CacheConfig:
    label: str  # the policy coordinate
    name: str  # the registered policy
    params: dict[str, Any]  # everything but the budget
    budget: int | None  # None: the policy has no budget parameter

    def policy(self):
        params = dict(self.params)
        if self.budget is not None:
            params["budget"] = self.budget
        return cache_family.get(self.name, **params)


def parse_caches(caches, check: bool = True) -> list[CacheConfig]:
    """Normalize a grid {policy: [budgets]} or a list of names / (name, params) / built policies.
    check: build each configuration once so bad parameters fail now (otherwise they fail in their run)."""
    if isinstance(caches, (str, cache_family.CachePolicy)):
        caches = [caches]
    entries: list[tuple[str, dict[str, Any]]] = []
    if isinstance(caches, Mapping):
        for name, budgets in caches.items():
            budgets = [budgets] if isinstance(budgets, int) else list(budgets or [])
            if not _has_budget(name) or not budgets:
                entries.append((name, {}))
            else:
                entries += [(name, {"budget": int(b)}) for b in budgets]
    else:
        for entry in caches:
            if isinstance(entry, str):
                entries.append((entry, {}))
            elif isinstance(entry, cache_family.CachePolicy):
                entries.append((entry.name, _changed_params(entry)))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping):
                entries.append((entry[0], dict(entry[1])))
            else:
                raise ParameterError(f"cache entry {entry!r} is not a policy name, a (name, params) pair or a built "
                                     f"policy; registered policies: {', '.join(cache_family.available())}")
    configs = []
    for name, params in entries:
        if check:  # unknown names and bad parameters fail here, before any run
            cache_family.get(name, **params)
        has_budget = _has_budget(name)  # unknown names always fail here
        budget = params.pop("budget", None) if has_budget else None
        if has_budget and budget is None:
            budget = _default_budget(name)
        extra = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        configs.append(CacheConfig(f"{name}({extra})" if extra else name, name, params,
                                   None if budget is None else int(budget)))
    seen = set()
    for config in configs:
        key = (config.label, config.budget)
        if key in seen:
            raise ParameterError(f"cache {config.label} at budget {config.budget} is listed twice")
        seen.add(key)
    return configs


def _has_budget(name: str) -> bool:
    cls = cache_family.registry.component_class(name)
    return any(spec.name == "budget" for spec in cls.parameters())


def _default_budget(name: str) -> int:
    cls = cache_family.registry.component_class(name)
    return next(spec.default for spec in cls.parameters() if spec.name == "budget")


def _changed_params(policy) -> dict[str, Any]:
    defaults = {spec.name: spec.default for spec in type(policy).parameters()}
    return {k: v for k, v in policy.params().items() if v != defaults.get(k) or k == "budget"}


def evaluate(model, caches, tasks: Iterable[Task] | None = None, seeds: int | Iterable[int] = 1, *,
             progress: bool = True, errors: str = "raise", max_new_tokens: int = 16, chunk: int = 1,
             attention: Any = "sdpa", prefill: str = "replay") -> xr.Dataset:
    """Run every cache configuration on every task and seed. See the module docstring for the result.

    tasks          -- task generators (workbench.eval.tasks); default: Passkey(length=2000) and Perplexity()
    seeds          -- an int n (seeds 0..n-1) or the seeds themselves
    errors         -- "raise" stops at the first failing run; "record" leaves NaN where a configuration cannot
                      run (a WorkbenchError: a bad parameter, a prompt too long for the model), warns on stderr and
                      lists the failures in attrs["errors"]; any other exception is a bug and always propagates
    max_new_tokens -- reply length limit per question (retrieval tasks)
    chunk          -- continuation tokens per forward pass in perplexity tasks (1: decode-time eviction acts
                      between every two tokens)
    prefill        -- "replay": run each prompt's prefill once with the full cache and replay it into every
                      configuration's cache (exact, see workbench.eval.prefill; a cache that cannot be replayed
                      gets a real prefill); "run": a real prefill per configuration
    """
    if errors not in ("raise", "record"):
        raise ParameterError(f"errors must be 'raise' or 'record', got {errors!r}")
    if prefill not in ("replay", "run"):
        raise ParameterError(f"prefill must be 'replay' or 'run', got {prefill!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParameterError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    configs = parse_caches(caches, check=errors == "raise")
    if not configs:
        raise ParameterError("no cache configurations given")
    tasks = list(tasks) if tasks is not None else [Passkey(length=2000), Perplexity()]
    if not tasks or not all(isinstance(t, Task) and t.kind in ("retrieval", "perplexity") for t in tasks):
        raise ParameterError("tasks must be a non-empty list of workbench.eval.tasks generators "
                             "(Passkey(), Needle(), MultiKey(), MultiTurn(), Perplexity()); speed tasks run in "
                             "wb.sweep")
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ParameterError(f"task labels must be distinct, got {labels}; pass label='...' to tell them apart")
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ParameterError("no seeds given")

    policies = list(dict.fromkeys(c.label for c in configs))
    budgets = sorted({c.budget for c in configs if c.budget is not None}) or [NO_BUDGET]
    shape = (len(policies), len(budgets), len(tasks), len(seeds))
    out = {name: np.full(shape, np.nan) for name in
           ("accuracy", "correct", "questions", "perplexity", "nll", "peak_cache_bytes", "held_cache_bytes",
            "context_tokens", "seconds", "replayed")}
    replies = np.full(shape, "", dtype=object)
    failures: list[dict[str, Any]] = []

    bar = _progress_bar(len(seeds) * len(tasks) * len(configs)) if progress else None
    for seed in seeds:
        for task in tasks:
            sample = task.make(model.tokenizer, seed)
            record = None
            if prefill == "replay":  # one real prefill per prompt, replayed into every configuration's cache
                if bar is not None:
                    bar.set_postfix_str(f"prefill {task.label} seed={seed}", refresh=True)
                record = PrefillRecord.capture(model, first_prompt(model, sample), attention_family.get(attention))
            for config in configs:
                if bar is not None:
                    bar.set_postfix_str(f"{config.label} budget={config.budget} {task.label} seed={seed}",
                                        refresh=True)
                p = policies.index(config.label)
                columns = [budgets.index(config.budget)] if config.budget is not None else list(range(len(budgets)))
                t, s = labels.index(task.label), seeds.index(seed)
                started = time.perf_counter()
                try:
                    values, reply = score(model, sample, cache=config.policy(), max_new_tokens=max_new_tokens,
                                          chunk=chunk, attention=attention, record=record)
                except WorkbenchError as error:  # a configuration that cannot run (a bug is never a NaN cell)
                    if errors == "raise":
                        raise
                    failures.append({"policy": config.label, "budget": config.budget, "task": task.label,
                                     "seed": seed, "error": f"{type(error).__name__}: {error}"})
                    print(f"workbench.eval: {config.label} budget={config.budget} {task.label} seed={seed} "
                          f"failed: {type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}",
                          file=sys.stderr)
                    values, reply = {}, ""
                if values:
                    values["seconds"] = time.perf_counter() - started
                for name, value in values.items():
                    out[name][p, columns, t, s] = value
                replies[p, columns, t, s] = reply
                if bar is not None:
                    bar.update(1)
            del record
    if bar is not None:
        bar.close()

    dims = ("policy", "budget", "task", "seed")
    # strings as object arrays: netCDF (h5netcdf) stores those as variable-length strings, fixed-width numpy
    # unicode it cannot store at all
    ds = xr.Dataset({name: (dims, values) for name, values in out.items()},
                    coords={"policy": np.array(policies, dtype=object), "budget": budgets,
                            "task": np.array(labels, dtype=object), "seed": seeds})
    ds["reply"] = (dims, replies)
    ds.attrs.update(_attrs(model, configs, tasks, seeds, failures, max_new_tokens, chunk, attention))
    ds.attrs["prefill"] = prefill
    _describe_variables(ds)
    return ds


def first_prompt(model, sample) -> list[int]:
    """The tokens a sample's first forward pass prefills (what a PrefillRecord of it captures)."""
    return sample.context_ids if sample.kind == "perplexity" else prompt_ids(model, sample)


def score(model, sample, *, cache: Any = "full", attention: Any = "sdpa", router: Any = "native",
          decoder: Any = "greedy", max_new_tokens: int = 16, chunk: int = 1, record=None) -> tuple[dict, str]:
    """Run one sample with one configuration: its measures (a dict of numbers) and the model's reply text.

    The one place a task's sample is scored; `evaluate` and `wb.sweep` both call it. Retrieval replies are
    greedy (the decoder applies to speed samples only); `record` is a PrefillRecord of the sample's first prompt to
    replay (retrieval and perplexity)."""
    if sample.kind == "perplexity":
        result = perplexity(model, sample.context_ids, sample.continuation_ids, cache=cache, chunk=chunk,
                            attention=attention, record=record, router=router)
        return {"perplexity": result.perplexity, "nll": result.mean_nll, "peak_cache_bytes": result.peak_cache_bytes,
                "held_cache_bytes": result.held_cache_bytes,
                "context_tokens": len(sample.context_ids), "replayed": float(result.replayed)}, ""
    if sample.kind == "retrieval":
        talk = converse(model, sample, cache=cache, max_new_tokens=max_new_tokens, attention=attention,
                        record=record, router=router)
        return {"accuracy": talk.accuracy, "correct": sum(talk.correct), "questions": len(talk.correct),
                "peak_cache_bytes": talk.peak_cache_bytes, "held_cache_bytes": talk.held_cache_bytes,
                "context_tokens": talk.prompt_tokens,
                "replayed": float(talk.replayed)}, \
            " | ".join(talk.replies)
    if sample.kind == "speed":
        from workbench.run import generate

        run = generate(model, sample.messages, attention=attention, cache=cache, decoder=decoder, router=router,
                       max_new_tokens=sample.new_tokens, ignore_eos=True)
        return {"tokens_per_s": run.tokens_per_s, "decode_tokens_per_s": run.decode_tokens_per_s,
                "prefill_seconds": run.prefill_seconds, "new_tokens": len(run.token_ids),
                "peak_cache_bytes": run.peak_cache_bytes, "held_cache_bytes": run.held_cache_bytes,
                "context_tokens": len(run.prompt_ids)}, run.text
    raise WorkbenchError(f"task '{sample.task}' made a sample of unknown kind {sample.kind!r}")


def _attrs(model, configs, tasks, seeds, failures, max_new_tokens, chunk, attention) -> dict[str, Any]:
    import transformers

    from workbench.version import __version__

    attention_name = attention if isinstance(attention, str) else attention.name
    return {
        "model": model.name,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "caches": json.dumps([{"label": c.label, "name": c.name, "params": c.params, "budget": c.budget}
                              for c in configs]),
        "budget_free_policies": json.dumps(sorted({c.label for c in configs if c.budget is None})),
        "tasks": json.dumps([{"name": t.name, "kind": t.kind, **t.params()} for t in tasks]),
        "seeds": json.dumps(seeds),
        "max_new_tokens": max_new_tokens,
        "perplexity_chunk": chunk,
        "attention": attention_name,
        "errors": json.dumps(failures),
        "notes": ("budget: tokens kept per layer and KV head; a policy without a budget parameter fills every "
                  "budget column (budget 0 means no configuration had one). peak_cache_bytes: the most the cache "
                  "held at any moment (a pass's keys and values before the policy compressed them included); "
                  "held_cache_bytes: the most it held after a forward pass. Retrieval replies are greedy; a reply is correct when its first "
                  "number is the answer."),
        "workbench_version": __version__,
        "torch_version": str(torch.__version__),
        "transformers_version": transformers.__version__,
    }


def _describe_variables(ds: xr.Dataset) -> None:
    units = {
        "accuracy": ("fraction of questions answered correctly", "1"),
        "correct": ("questions answered correctly", "1"),
        "questions": ("questions asked", "1"),
        "perplexity": ("perplexity of the continuation", "1"),
        "nll": ("mean negative log-likelihood per continuation token", "nats"),
        "peak_cache_bytes": ("most bytes the cache held at any moment, uncompressed prefill included", "bytes"),
        "held_cache_bytes": ("most bytes the cache held after a forward pass", "bytes"),
        "context_tokens": ("prompt (retrieval) or context (perplexity) tokens", "1"),
        "seconds": ("wall time of the run (a replayed prefill costs nothing here)", "s"),
        "replayed": ("1 where the prompt's prefill was replayed from one shared full-cache prefill", "1"),
        "reply": ("the model's replies, ' | '-joined over turns", ""),
    }
    for name, (description, unit) in units.items():
        ds[name].attrs.update(description=description, units=unit)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="run")
