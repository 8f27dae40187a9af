"""The `workbench` command: streaming text and a summary, JSON, traces, listings and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

import workbench as wb
from workbench.cli import main

TINY = ["--model", "tiny:llama", "--raw"]


def test_run_streams_text_then_summarizes(capsys):
    assert main(["run", "--prompt", "hello", *TINY, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    expected = wb.generate(wb.tiny("llama"), "hello", max_new_tokens=5).text
    assert out.startswith(expected)
    assert "tokens/s" in out and "cache: peak" in out and "next-token entropy: mean" in out


def test_json_summary_and_trace(capsys, tmp_path):
    path = tmp_path / "out.nc"
    assert main(["run", "--prompt", "hello", *TINY, "--max-new-tokens", "4", "--json", "--trace", str(path),
                 "--decoder", "sample", "--set", "decoder.temperature=0.5", "--set", "decoder.seed=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_tokens"] == 4 and summary["trace"] == str(path)
    assert summary["config"]["decoder_params"]["temperature"] == 0.5
    assert set(summary["entropy"]) >= {"mean", "max", "attention_mean_by_layer"}
    trace = wb.load_trace(path)
    assert trace.sizes["step"] == 4 and "entropy" in trace and "cache_bytes" in trace


@pytest.mark.parametrize("argv,message", [
    (["--attention", "nope"], "error: unknown attention 'nope'; registered: " + ", ".join(wb.attention.available())),
    (["--budget", "128"], "error: cache 'full' has no parameter 'budget'; its parameters: none"),
    (["--set", "decoder.temperature"], "error: --set takes FAMILY.PARAM=VALUE"),
    (["--set", "widget.size=3"], "error: --set 'widget.size=3': unknown family 'widget'"),
    (["--record", "experts"], "error: cannot record 'experts'"),
    (["--max-new-tokens", "-3"], "error: max_new_tokens must be an integer >= 0"),
    (["--report", "run.pdf"], "error: a report is an HTML file: give a path ending in .html, got 'run.pdf'"),
    (["--attention", "sliding_window", "--set", "attention.window=0"],
     "error: attention 'sliding_window' parameter 'window' is 0; it must be >= 1"),
    (["--attention", "sink_window", "--set", "attention.sinks=8", "--set", "attention.window=4"],
     "error: attention 'sink_window': sinks (8) must be <= window (4)"),
    (["--attention", "block_sparse", "--set", "attention.pattern=diagonal"],
     "error: attention 'block_sparse' parameter 'pattern'"),
])
def test_errors_are_one_line_and_non_zero(capsys, argv, message):
    assert main(["run", "--prompt", "hello", *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_an_internal_error_shows_its_traceback_and_exits_1(capsys, monkeypatch):
    """A bug is not the user's mistake: the traceback says where it happened (a user error stays one line)."""
    def broken(*args, **kwargs):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr("workbench.run.generate", broken)
    assert main(["run", "--prompt", "hello", *TINY]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug deep inside'" in err
    assert "internal error" in err


def test_sparse_attention_from_the_command_line_reports_fidelity(capsys):
    assert main(["run", "--prompt", "hello there, tiny model", *TINY, "--max-new-tokens", "3", "--attention",
                 "block_sparse", "--set", "attention.pattern=vertical_slash", "--set", "attention.block_size=16",
                 "--record", "fidelity"]) == 0
    out = capsys.readouterr().out
    assert "fidelity vs dense: attention recall mean" in out and "KL mean" in out


def test_report_records_what_its_plots_need(capsys, tmp_path):
    path = tmp_path / "run.html"
    assert main(["run", "--prompt", "hello", *TINY, "--max-new-tokens", "4", "--report", str(path)]) == 0
    assert f"report written to {path}" in capsys.readouterr().out
    page = path.read_text(encoding="utf-8")
    for plot in ("entropy_curve", "cache_bytes", "attention_pattern layer 0 head 0",
                 "attention_pattern layer 1 head 0"):  # the tiny model's first and last layers
        assert f"<h3>{plot}</h3>" in page
    recorded = "[&quot;attention&quot;, &quot;cache&quot;, &quot;decoding&quot;, &quot;entropy&quot;]"
    assert f"<th>record</th><td>{recorded}</td>" in page


def test_report_keeps_the_records_the_user_chose(capsys, tmp_path):
    path = tmp_path / "run.html"
    assert main(["run", "--prompt", "hello", *TINY, "--max-new-tokens", "3", "--record", "entropy", "--json",
                 "--report", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(path)
    page = path.read_text(encoding="utf-8")
    assert "<h3>entropy_curve</h3>" in page
    assert "<h3>attention_pattern" not in page and "<h3>cache_bytes</h3>" not in page


def test_list_shows_every_component(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for module in wb.FAMILIES.values():
        for name in module.available():
            assert f"  {name} " in out
    assert main(["list", "decoder", "-v"]) == 0
    assert "top_p = 1.0" in capsys.readouterr().out


@pytest.mark.embedded
def test_installed_command_on_the_embedded_model(embedded):
    """The real entry point in a fresh process: text from SmolLM2, and a bad name exits 2 without a traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "--prompt", "What is the capital of France?",
                         "--max-new-tokens", "12"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Paris" in ok.stdout and "tokens/s" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "--prompt", "hi", "--attention", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown attention 'nope'; registered: " + ", ".join(wb.attention.available())
