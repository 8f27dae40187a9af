"""Sweeps: the grid's cells, the results store (resume after SIGKILL, nothing lost or duplicated), Ray workers,
the dataset and its pictures, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import workbench as wb
from workbench.eval import Passkey, converse, perplexity
from workbench.eval.tasks import Perplexity
from workbench.sweeps import Grid, SweepError
from workbench.sweeps.dataset import TIMING
from workbench.sweeps.execute import local_threads
from workbench.sweeps.plots import pareto

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "workbench.cli"]

# A small grid on the tiny model: 3 policies x 2 budgets x 2 tasks x 2 seeds = 24 points, 20 cells (the full
# cache has no budget, so its 2 budget columns share one cell per task and seed).
GRID = {"model": "tiny:llama",
        "axes": {"cache": ["full", "snapkv", "h2o"], "budget": [48, 64],
                 "task": [{"passkey": {"length": 400}}, {"perplexity": {"context": 200, "continuation": 64}}],
                 "seed": [0, 1]}}


def measures_equal(a, b) -> None:
    """Every measure but wall times, and the replies, agree exactly."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        if name in TIMING:
            continue
        other = b[name].transpose(*a[name].dims).sel({d: a[d].values for d in a[name].dims})
        if a[name].dtype.kind == "f":
            np.testing.assert_array_equal(a[name].values, other.values, err_msg=name)
        else:
            assert (a[name].values == other.values).all(), name


def cell_files(store: Path) -> list[Path]:
    return sorted((store / "cells").glob("*.json")) if (store / "cells").exists() else []


# -- the grid ------------------------------------------------------------------------------------------------------
def test_points_that_agree_on_what_applies_share_one_cell():
    plan = Grid.parse(GRID).plan()
    assert len(plan.points) == 3 * 2 * 2 * 2
    assert len(plan.cells) == (1 + 2 + 2) * 2 * 2  # full: one cell for both budgets
    full = [k for p, k in zip(plan.points, plan.point_keys) if p["cache"] == "full"]
    assert len(full) == 8 and len(set(full)) == 4
    # a decoder axis changes only the speed task; a cache parameter only the policies that have it
    grid = Grid.parse({"model": "tiny:llama", "axes": {
        "decoder": ["greedy", {"sample": {"temperature": 0.5}}], "cache": ["full", "snapkv"],
        "cache.window": [8, 16], "task": [{"perplexity": {"context": 64}}, {"speed": {"new_tokens": 4}}]}})
    cells = {}
    for point, key in zip(grid.plan().points, grid.plan().point_keys):
        cells.setdefault((point["task"], point["cache"]), set()).add(key)
    assert len(cells[("perplexity", "full")]) == 1  # neither decoder nor window applies
    assert len(cells[("perplexity", "snapkv")]) == 2  # window applies
    assert len(cells[("speed", "full")]) == 2  # the decoder applies
    assert len(cells[("speed", "snapkv")]) == 4


def test_a_cell_is_keyed_by_its_full_configuration_defaults_included():
    given = Grid.parse({"axes": {"cache": ["snapkv"]}, "task": "perplexity"}).plan()
    spelled = Grid.parse({"axes": {"cache": [{"snapkv": {"window": 32}}]}, "task": "perplexity"}).plan()
    other = Grid.parse({"axes": {"cache": [{"snapkv": {"window": 16}}]}, "task": "perplexity"}).plan()
    assert wb.cache.get("snapkv").window == 32  # the default spelled out is the same configuration
    assert list(given.cells) == list(spelled.cells) != list(other.cells)
    config = next(iter(given.cells.values())).config
    assert config["cache"]["params"] == wb.cache.get("snapkv").params()


@pytest.mark.parametrize("definition, message", [
    ({"axes": {"cache": ["nope"]}}, "unknown cache 'nope'"),
    ({"axes": {"cache": [{"snapkv": {"windw": 8}}]}}, "has no parameter 'windw'"),
    ({"axes": {"colour": [1]}}, "unknown axis 'colour'"),
    ({"axes": {"budget": []}}, "axis 'budget' is empty"),
    ({"axes": {"cache": ["full", "streaming_llm"], "cache.topk": [1]}}, "has a parameter 'topk'"),
    ({"axes": {"task": ["haystack"]}}, "unknown task 'haystack'"),
    ({"axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"axes": {"cache": ["full"]}, "settings": {"chunk": 0}}, "chunk must be an integer >= 1"),
    ({"cache": "full"}, "needs 'axes'"),
])
def test_bad_definitions_fail_in_one_line_naming_what_is_wrong(definition, message):
    with pytest.raises(wb.WorkbenchError, match=message) as caught:
        wb.sweep(definition, progress=False)
    assert "\n" not in str(caught.value)


def test_invalid_combinations_are_reported_before_anything_runs(tmp_path):
    grid = {"model": "tiny:llama", "axes": {"cache": ["h2o", "snapkv"], "budget": [16, 48],
                                            "task": [{"perplexity": {"context": 64, "continuation": 8}}]}}
    with pytest.raises(SweepError, match=r"1 of 4 grid points are invalid: cache 'snapkv' budget 16 is smaller") as e:
        wb.sweep(grid, tmp_path / "store", progress=False)
    assert "cache=snapkv budget=16" in str(e.value) and "\n" not in str(e.value)
    assert cell_files(tmp_path / "store") == []
    ds = wb.sweep(grid, tmp_path / "store", skip_invalid=True, progress=False)
    assert ds.status.sel(cache="snapkv", budget=16).item() == "invalid"
    assert (ds.status.values == "done").sum() == 3 and len(cell_files(tmp_path / "store")) == 3


def test_a_store_of_an_incompatible_sweep_is_refused_and_left_alone(tmp_path):
    grid = {"model": "tiny:llama", "axes": {"cache": ["full"], "task": [{"perplexity": {"context": 64,
                                                                                        "continuation": 8}}]}}
    store = tmp_path / "store"
    wb.sweep(grid, store, progress=False)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(SweepError, match="incompatible sweep .*chunk: store 1, this sweep 4") as e:
        wb.sweep({**grid, "settings": {"chunk": 4}}, store, progress=False)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    (tmp_path / "other" / "cells").mkdir(parents=True)
    (tmp_path / "other" / "cells" / "x.json").write_text("{}")
    with pytest.raises(SweepError, match="not written by wb.sweep"):
        wb.sweep(grid, tmp_path / "other", progress=False)


def test_a_store_can_be_any_fsspec_url(tiny_llama):
    import fsspec

    grid = {"model": "tiny:llama", "axes": {"cache": ["full", "snapkv"], "task": [{"perplexity": {
        "context": 64, "continuation": 8}}]}}
    first = wb.sweep(grid, "memory://sweeps/one", progress=False, models={"tiny:llama": tiny_llama})
    names = sorted(fsspec.filesystem("memory").ls("/sweeps/one/cells", detail=False))
    assert len(names) == 2 and all(n.endswith(".json") for n in names)
    again = wb.sweep(grid, "memory://sweeps/one", progress=False)
    assert again.attrs["cells_computed"] == 0
    measures_equal(first, again)


# -- what a cell measures ------------------------------------------------------------------------------------------
def test_cells_measure_what_the_evaluation_loops_measure_directly(tiny_llama, tmp_path):
    """The sweep's numbers (one shared prefill replayed into every cache) against the loops run directly, each
    with a real prefill of its own."""
    ds = wb.sweep(GRID, tmp_path / "store", progress=False, models={"tiny:llama": tiny_llama})
    passkey, text = Passkey(length=400), Perplexity(context=200, continuation=64)
    for cache, budget, seed in [("full", 48, 0), ("snapkv", 48, 1), ("h2o", 64, 0)]:
        policy = wb.cache.get(cache) if cache == "full" else wb.cache.get(cache, budget=budget)
        talk = converse(tiny_llama, passkey.make(tiny_llama.tokenizer, seed), cache=policy)
        sample = text.make(tiny_llama.tokenizer, seed)
        direct = perplexity(tiny_llama, sample.context_ids, sample.continuation_ids, cache=policy)
        point = dict(cache=cache, budget=budget, seed=seed)
        assert ds.reply.sel(**point, task="passkey").item() == talk.replies[0]
        assert ds.accuracy.sel(**point, task="passkey").item() == talk.accuracy
        assert ds.peak_cache_bytes.sel(**point, task="passkey").item() == talk.peak_cache_bytes
        assert ds.nll.sel(**point, task="perplexity").item() == pytest.approx(direct.mean_nll, rel=1e-6)
    assert (ds.status.values == "done").all()
    assert np.isnan(ds.accuracy.sel(task="perplexity")).all() and np.isnan(ds.nll.sel(task="passkey")).all()
    assert ds.attrs["cells_computed"] == 20 and ds.attrs["cells_reused"] == 0
    assert ds.attrs["commit"].startswith(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                        capture_output=True, text=True).stdout.strip())
    assert len(ds.attrs["lock_sha256"]) == 64


def test_speed_cells_generate_the_tokens_asked_for_with_each_decoder(tiny_llama):
    ds = wb.sweep({"model": "tiny:llama", "axes": {"decoder": ["greedy", "sample"], "seed": [0, 1]},
                   "task": {"speed": {"new_tokens": 6}}}, progress=False, models={"tiny:llama": tiny_llama})
    assert (ds.new_tokens.values == 6).all() and (ds.tokens_per_s.values > 0).all()
    run = wb.generate(tiny_llama, [{"role": "user", "content": wb.eval.tasks.Speed.PROMPTS[1]}],
                      max_new_tokens=6, ignore_eos=True)
    assert ds.reply.sel(decoder="greedy", seed=1).item() == run.text
    sampled = wb.generate(tiny_llama, [{"role": "user", "content": wb.eval.tasks.Speed.PROMPTS[1]}],
                          decoder=wb.decode.get("sample", seed=1), max_new_tokens=6, ignore_eos=True)
    assert ds.reply.sel(decoder="sample", seed=1).item() == sampled.text


# -- resuming ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweep_killed_midway_resumes_without_recomputing_or_losing_cells(tiny_llama, tmp_path):
    definition = tmp_path / "grid.yaml"
    definition.write_text(yaml.safe_dump(GRID, sort_keys=False))
    store = tmp_path / "store"
    child = subprocess.Popen(CLI + ["sweep", str(definition), "--store", str(store), "--no-progress"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(cell_files(store)) < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = {p.name: p.read_bytes() for p in cell_files(store)}
    assert 4 <= len(finished) < 20, f"the kill came too late to test resuming ({len(finished)} of 20 cells)"
    resumed = wb.sweep(definition, store, progress=False, models={"tiny:llama": tiny_llama})
    assert resumed.attrs["cells_reused"] == len(finished)
    assert resumed.attrs["cells_computed"] == 20 - len(finished)
    assert {p.name: p.read_bytes() for p in cell_files(store) if p.name in finished} == finished
    keys = [json.loads(p.read_text())["key"] for p in cell_files(store)]
    assert len(keys) == len(set(keys)) == 20
    assert sorted(keys) == sorted(Grid.parse(GRID).plan().cells)
    serial = wb.sweep(GRID, progress=False, models={"tiny:llama": tiny_llama})
    measures_equal(resumed, serial)
    again = wb.sweep(definition, store, progress=False, models={"tiny:llama": tiny_llama})
    assert again.attrs["cells_computed"] == 0


def test_failed_cells_are_kept_and_retried_only_when_asked(tiny_llama, tmp_path):
    grid = {"model": "tiny:llama", "axes": {"task": [{"passkey": {"length": 100}},
                                                     {"perplexity": {"context": 64, "continuation": 8}}]}}
    ds = wb.sweep(grid, tmp_path, progress=False, models={"tiny:llama": tiny_llama})
    assert ds.status.sel(task="passkey").item() == "failed"
    assert "length 100 is too short" in ds.error.sel(task="passkey").item()
    assert ds.status.sel(task="perplexity").item() == "done"
    assert wb.sweep(grid, tmp_path, progress=False).attrs["cells_computed"] == 0
    retried = wb.sweep(grid, tmp_path, progress=False, retry_failed=True, models={"tiny:llama": tiny_llama})
    assert retried.attrs["cells_computed"] == 1
    assert wb.sweep.status(grid, tmp_path) == {"done": 1, "failed": 1, "pending": 0, "invalid": 0, "cells": 2,
                                               "points": 2}


# -- Ray -----------------------------------------------------------------------------------------------------------
@dataclass
class CrashesOnce(Passkey):
    """A passkey task that kills the process making its first sample (a worker dying mid-cell, once)."""

    marker: str = ""
    name = "crashes_once"

    def make(self, tokenizer, seed):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(3)
        return super().make(tokenizer, seed)


@dataclass
class AlwaysCrashes(Passkey):
    name = "always_crashes"

    def make(self, tokenizer, seed):
        os._exit(3)


@pytest.mark.slow
def test_two_ray_workers_give_the_serial_numbers_and_survive_dying_workers(tiny_llama, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers unpickle this test's tasks
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one local cluster for both sweeps
    try:
        ds = wb.sweep(GRID, tmp_path / "store", workers=2, progress=False)
        crashing = {"model": "tiny:llama", "axes": {"task": [
            CrashesOnce(length=400, marker=str(tmp_path / "crashed")), AlwaysCrashes(length=400),
            {"perplexity": {"context": 64, "continuation": 8}}]}}
        survived = wb.sweep(crashing, tmp_path / "crashing", workers=2, progress=False)
    finally:
        ray.shutdown()
    workers = {json.loads(p.read_text())["worker"] for p in cell_files(tmp_path / "store")}
    assert len(workers) == 2 and os.getpid() not in {int(w.split(":")[1]) for w in workers}
    # float sums depend on how many threads split them: the serial reference runs with a worker's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(local_threads(2))
    try:
        serial = wb.sweep(GRID, progress=False, models={"tiny:llama": tiny_llama})
    finally:
        torch.set_num_threads(threads)
    measures_equal(ds, serial)
    assert survived.status.sel(task="crashes_once").item() == "done"  # rescheduled on a new worker
    assert survived.status.sel(task="always_crashes").item() == "failed"  # recorded after two deaths
    assert "WorkerDied: the worker process died 2 times" in survived.error.sel(task="always_crashes").item()
    assert survived.status.sel(task="perplexity").item() == "done"
    err = capsys.readouterr().err
    assert err.count("rescheduling it") == 2 and "killed its worker 2 times" in err


# -- the dataset's pictures and table ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(tiny_models, tmp_path_factory):
    return wb.sweep(GRID, tmp_path_factory.mktemp("swept"), progress=False,
                    models={"tiny:llama": tiny_models["llama"]})


def test_the_table_shows_seed_means_per_task(swept):
    text = wb.sweep.table(swept)
    block = text.split("perplexity: perplexity, mean over 2 seeds\n")[1].split("\n\n")[0].splitlines()
    assert block[0].split() == ["cache", "48", "64"]
    snapkv = dict(zip(["48", "64"], block[2].split()[1:]))
    expected = np.mean([swept.perplexity.sel(cache="snapkv", budget=48, task="perplexity", seed=s).item()
                        for s in (0, 1)])
    assert snapkv["48"] == f"{expected:.2f}"
    assert "grid points: 24 done" in text


def test_pareto_front_of_hand_built_points():
    points = np.array([[1.0, 0.2], [2.0, 0.8], [3.0, 0.5], [2.0, 0.9], [4.0, 0.9], [0.5, 0.1]])
    assert sorted(pareto(points, higher_y=True).tolist()) == [0, 3, 5]
    assert sorted(pareto(points, higher_y=False).tolist()) == [5]


def test_heatmap_spread_and_frontier_show_the_dataset(swept):
    heat = wb.sweep.heatmap(swept, "perplexity", x="budget", y="cache")
    frame = heat.HeatMap.I.data
    cell = frame[(frame.budget == "64") & (frame.cache == "h2o")]["perplexity"].item()
    assert cell == pytest.approx(float(swept.perplexity.sel(cache="h2o", budget=64).mean(skipna=True)))
    bars = wb.sweep.spread(swept, "perplexity", x="budget", by="cache")
    errors = [layer for layer in bars.traverse(lambda e: e) if type(layer).__name__ == "ErrorBars"]
    std = swept.perplexity.sel(task="perplexity", cache="snapkv").std("seed").values
    snapkv = errors[[str(c) for c in swept.cache.values].index("snapkv")].data["std"].to_numpy()
    np.testing.assert_allclose(snapkv, std)
    front = wb.sweep.frontier(swept, x="peak_cache_bytes", y="nll")
    ringed = [layer for layer in front.traverse(lambda e: e) if getattr(layer, "label", "") == "Pareto-optimal"][0]
    assert len(ringed.data) >= 1
    with pytest.raises(wb.WorkbenchError, match="no measure 'bleu'"):
        wb.sweep.heatmap(swept, "bleu")


def test_the_command_line_runs_reports_status_and_refuses_bad_input(tmp_path):
    definition = tmp_path / "grid.yaml"
    definition.write_text(yaml.safe_dump({"model": "tiny:llama", "axes": {"cache": ["full", "snapkv"]},
                                          "task": {"perplexity": {"context": 64, "continuation": 8}}}))
    done = subprocess.run(CLI + ["sweep", str(definition), "--no-progress", "--out", str(tmp_path / "r.nc")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 cells computed, 0 reused" in done.stdout and (tmp_path / "grid.results" / "sweep.json").exists()
    state = subprocess.run(CLI + ["sweep", "status", str(definition)], capture_output=True, text=True)
    assert "2 done, 0 failed, 0 pending of 2 cells" in state.stdout
    (tmp_path / "bad.yaml").write_text("axes: {cache: [full, nope]}")
    bad = subprocess.run(CLI + ["sweep", str(tmp_path / "bad.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown cache 'nope'" in bad.stderr
