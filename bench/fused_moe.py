"""Benchmark: the fused MoE Triton kernel against transformers' experts implementations, in one process.

Shapes (one layer's routed experts, random weights, std 0.02):
  mixtral  hidden 4096, intermediate 14336, 8 experts, top-2 (Mixtral-8x7B; 2.8 GB in 16-bit; the intermediate
           is halved until the weights fit in half the free GPU memory, and the label says so)
  qwen3    hidden 2048, moe intermediate 768, 128 experts, top-8 (Qwen3-30B-A3B)
at 1, 16, 128, 1024 and 4096 tokens, in bfloat16 and float16. Routing: softmax of random logits, top-k,
renormalised (Mixtral's and Qwen3's norm_topk_prob). Methods, all on the same experts module (MixtralExperts /
Qwen3MoeExperts), switched through config._experts_implementation, under torch.inference_mode():
  workbench   "workbench_fused_moe" (kernels/fused_moe.py: Triton grouped GEMMs, SwiGLU fused)
  grouped_mm  transformers' default (sort + torch grouped_mm)
  batched_mm  transformers' bmm over per-pair gathered weights (skipped where those copies would not fit)
  eager       the module's own loop over the experts with tokens
Before timing, every method's output is compared with workbench.kernels.fused_moe_reference (float32 math on the
same weights): max|diff| is relative to max|reference|, and a method off by more than 3e-2 (bf16) / 1e-2 (fp16)
is marked MISMATCH (exit status 1). Times are medians of triton.testing.do_bench; ratio = ms / grouped_mm's ms in
the same case (< 1: faster than grouped_mm). TFLOP/s counts 6 * tokens * k * hidden * intermediate; GB/s counts
the weights of the experts the case touches, read once (what bounds decoding).

    .venv/bin/python bench/fused_moe.py                               # needs a CUDA GPU
    .venv/bin/python bench/fused_moe.py --shapes qwen3 --tokens 1,128 --dtypes bfloat16
    .venv/bin/python bench/fused_moe.py --interpret-smoke             # tiny shape on CPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch

METHODS = ("workbench", "grouped_mm", "batched_mm", "eager")
IMPLEMENTATIONS = {"workbench": "workbench_fused_moe", "grouped_mm": "grouped_mm", "batched_mm": "batched_mm",
                   "eager": "eager"}
SHAPES = {  # name: (hidden, intermediate, experts, top_k, transformers config class)
    "mixtral": (4096, 14336, 8, 2, "MixtralConfig"),
    "qwen3": (2048, 768, 128, 8, "Qwen3MoeConfig"),
}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclass
class Case:
    shape: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    tokens: int
    dtype: torch.dtype
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.shape} T={self.tokens} {str(self.dtype).removeprefix('torch.')}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,qwen3", help="comma-separated subset of " + ", ".join(SHAPES))
    parser.add_argument("--tokens", default="1,16,128,1024,4096", help="token counts (default 1,16,128,1024,4096)")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="default bfloat16,float16")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="a tiny shape on CPU under the Triton interpreter: checks the script, times mean nothing")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return parser.parse_args(argv)


def make_cases(args, device) -> list[Case]:
    if args.interpret_smoke:  # float32: the interpreter computes bf16 dots wrongly
        return [Case("smoke", 32, 64, 4, 2, t, torch.float32) for t in (1, 7)]
    cases = []
    for shape in _names(args.shapes, SHAPES):
        hidden, inter, experts, top_k, _ = SHAPES[shape]
        note = ""
        free = torch.cuda.mem_get_info(device)[0]
        while 3 * experts * hidden * inter * 2 > free / 2 and inter > 256:  # 16-bit weights in half the free memory
            inter //= 2
            note = f"intermediate scaled down to {inter} to fit"
        for dtype in (getattr(torch, d) for d in _names(args.dtypes, ("bfloat16", "float16"))):
            cases += [Case(shape, hidden, inter, experts, top_k, t, dtype, note) for t in _ints(args.tokens)]
    return cases


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str, allowed) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        sys.exit(f"error: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


# -- the experts module and its inputs ------------------------------------------------------------------------

def build_experts(case: Case, device):
    """The transformers experts module of the shape's model family, weights random on `device`."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    if case.shape == "qwen3":
        config = transformers.Qwen3MoeConfig(hidden_size=case.hidden, moe_intermediate_size=case.inter,
                                             num_experts=case.experts, num_experts_per_tok=case.top_k)
        cls = Qwen3MoeExperts
    else:
        config = transformers.MixtralConfig(hidden_size=case.hidden, intermediate_size=case.inter,
                                            num_local_experts=case.experts, num_experts_per_tok=case.top_k)
        cls = MixtralExperts
    with torch.device("meta"):  # no full-size float32 copy on the host
        experts = cls(config)
    generator = torch.Generator(device=device).manual_seed(0)
    for name in ("gate_up_proj", "down_proj"):
        shape = getattr(experts, name).shape
        weight = torch.randn(shape, generator=generator, device=device, dtype=case.dtype) * 0.02
        setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
    return experts.eval(), config


def routing(case: Case, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(case.tokens)
    hidden = torch.randn(case.tokens, case.hidden, generator=generator, device=device, dtype=case.dtype)
    logits = torch.randn(case.tokens, case.experts, generator=generator, device=device)
    weights, index = torch.softmax(logits, -1).topk(case.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(case.dtype)
    return hidden, index, weights


# -- measuring ------------------------------------------------------------------------------------------------

def measure(fn, device: torch.device) -> tuple[float | None, str]:
    """(median ms, note); an OOM or failure is reported, not raised."""
    try:
        if device.type != "cuda":  # --interpret-smoke: a plain timer, two calls after a warm-up
            fn()
            times = []
            for _ in range(2):
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
            return statistics.median(times), ""
        import triton.testing

        fn()  # Triton JIT outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "OOM"
    except Exception as error:  # a peer that cannot run this case: say so and keep going
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def run_case(case: Case, names, device) -> tuple[list[dict], bool]:
    from workbench.kernels import fused_moe_reference

    experts, config = build_experts(case, device)
    hidden, index, weights = routing(case, device)
    reference = fused_moe_reference(hidden, experts.gate_up_proj, experts.down_proj, index, weights).float()
    scale = reference.abs().max().item() or 1.0
    element = torch.empty((), dtype=case.dtype).element_size()
    per_expert = 3 * case.hidden * case.inter * element
    touched = int(torch.unique(index).numel()) * per_expert
    work = 6.0 * case.tokens * case.top_k * case.hidden * case.inter
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    rows, ok = [], True
    for name in names:
        note = case.note
        if name == "batched_mm" and case.tokens * case.top_k * per_expert > free / 2:
            gib = case.tokens * case.top_k * per_expert / 2**30
            rows.append(_row(case, name, None, None, f"skipped: gathers {gib:.0f} GiB of weights", work, touched))
            continue

        def call(implementation=IMPLEMENTATIONS[name]):
            config._experts_implementation = implementation
            return experts(hidden, index, weights)

        error = None
        try:  # every method must compute the same experts, or the comparison means nothing
            with torch.inference_mode():
                error = (call().float() - reference).abs().max().item() / scale
        except Exception as failure:
            note = "; ".join(x for x in (note, f"failed: {type(failure).__name__}") if x)
        if error is not None and not error <= TOLERANCE[case.dtype]:
            ok = False
            note = "; ".join(x for x in ("MISMATCH", note) if x)
        with torch.inference_mode():
            ms, failure = measure(call, device)
        rows.append(_row(case, name, ms, error, "; ".join(x for x in (failure, note) if x), work, touched))
    base = next((r["ms"] for r in rows if r["method"] == "grouped_mm" and r["ms"]), None)
    for r in rows:
        r["ratio"] = r["ms"] / base if base and r["ms"] else None
    return rows, ok


def _row(case, name, ms, error, note, work, touched) -> dict:
    row = {"case": case.label, "shape": case.shape, "tokens": case.tokens, "dtype": str(case.dtype),
           "method": name, "ms": ms, "max_rel_diff": error, "note": note}
    if ms:
        row["tflops"] = work / (ms * 1e-3) / 1e12
        row["gb_s"] = touched / (ms * 1e-3) / 1e9
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<26} {'method':<11} {'ms':>9} {'/grouped':>8} {'TFLOP/s':>8} {'GB/s':>7} {'max|diff|':>9}  note")
    for r in rows:
        def fmt(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        print(f"{r['case']:<26} {r['method']:<11} {fmt('ms', '.3f'):>9} {fmt('ratio', '.2f'):>8} "
              f"{fmt('tflops', '.1f'):>8} {fmt('gb_s', '.0f'):>7} {fmt('max_rel_diff', '.1e'):>9}  {r['note']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.interpret_smoke:
        print("bench/fused_moe.py measures GPU kernels and needs a CUDA device (--interpret-smoke checks the script "
              "on CPU); nothing to do")
        return 0
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before workbench.kernels defines its kernels
        warnings.simplefilter("ignore")
    names = _names(args.methods, METHODS)
    device = torch.device("cuda" if cuda else "cpu")
    import triton

    import workbench.kernels  # noqa: F401  (registers "workbench_fused_moe" with transformers)

    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: timings mean nothing)"
    print(f"{where}, torch {torch.__version__}, triton {triton.__version__}")
    rows, all_ok = [], True
    for case in make_cases(args, device):
        case_rows, ok = run_case(case, names, device)
        if cuda:
            torch.cuda.empty_cache()  # the case's experts are gone: give their memory back before the next
        rows += case_rows
        all_ok &= ok
        print_table(case_rows)
        print()
    if args.json:
        print(json.dumps(rows, indent=2))
    if not all_ok:
        print("MISMATCH: some method's output differs from the reference beyond tolerance (see the table)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
