"""Benchmark: the fused flash-attention kernel (with and without statistics) against its peers, in one process.

Shapes are Llama-3-8B attention (32 query heads over 8 KV heads, head_dim 128) in bfloat16:
  prefill  causal, batch 1, 2k / 8k / 16k tokens
  decode   one query against a 4k .. 64k cache, batch 1 and 8
Methods, all on the same tensors:
  flash            workbench.kernels.flash_attention_triton, output only
  flash+entropy    ... with lse and entropy from the same pass
  flash+key_mass   ... with the per-key attention mass (a second pass over the keys)
  sdpa             torch scaled_dot_product_attention restricted to its flash backend (sdpa_kernel)
  flex             torch FlexAttention, compiled, causal block mask
  eager            matmul + float32 softmax with the weights materialized (what output_attentions costs)
Times are medians of triton.testing.do_bench (CUDA graphs not used); peak memory is the allocator's peak above
the inputs for one call; max|diff| is each method's largest output difference from flash (a sanity check that
all of them compute the same attention). TFLOP/s counts causal matmul flops (4 B H sum-of-visible-keys D);
decode also shows the bytes of K and V read per call over time, and that as a share of H100 HBM bandwidth
(3.35 TB/s). Ratios are time ratios measured in the same run: flash / sdpa (< 1: flash is faster),
flash+entropy / flash and flash+key_mass / flash (the cost of the statistics).

    .venv/bin/python bench/attention.py                 # needs a CUDA GPU
    .venv/bin/python bench/attention.py --check         # first assert kernel == reference (bf16 included)
    .venv/bin/python bench/attention.py --only decode --batches 1 --contexts 4096,65536
    .venv/bin/python bench/attention.py --smoke         # tiny shapes on CPU (Triton interpreter): checks the script
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

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
METHODS = ("flash", "flash+entropy", "flash+key_mass", "sdpa", "flex", "eager")


@dataclass
class Case:
    kind: str  # "prefill" or "decode"
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.kind} B={self.batch} Q={self.q_len} K={self.k_len}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("prefill", "decode"), help="run one kind of case")
    parser.add_argument("--prefill", default="2048,8192,16384", help="prefill lengths (default 2048,8192,16384)")
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536", help="decode cache lengths")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--check", action="store_true", help="assert kernel == reference on the GPU first")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU runs the Triton interpreter")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return parser.parse_args(argv)


def make_cases(args) -> list[Case]:
    if args.smoke:  # interpreter-sized; float32 because the interpreter computes bf16 dots wrongly
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return [Case("prefill", 1, 4, 2, 64, 64, 64, dtype), Case("decode", 2, 4, 2, 1, 96, 64, dtype)]
    cases = []
    if args.only in (None, "prefill"):
        cases += [Case("prefill", 1, 32, 8, n, n, 128, torch.bfloat16) for n in _ints(args.prefill)]
    if args.only in (None, "decode"):
        cases += [Case("decode", b, 32, 8, 1, n, 128, torch.bfloat16)
                  for b in _ints(args.batches) for n in _ints(args.contexts)]
    return cases


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- the methods ----------------------------------------------------------------------------------------------

def build_methods(case: Case, q, k, v, names, smoke: bool):
    """name -> (zero-argument callable running that method on (q, k, v), note); set up outside the timing."""
    from workbench.kernels import flash_attention_triton

    scaling = case.head_dim ** -0.5
    causal = case.kind == "prefill"  # a single decoding query sees the whole cache
    methods = {}
    if "flash" in names:
        methods["flash"] = (lambda: flash_attention_triton(q, k, v, scaling=scaling, causal=causal), "")
    if "flash+entropy" in names:
        methods["flash+entropy"] = (lambda: flash_attention_triton(q, k, v, scaling=scaling, causal=causal,
                                                                   lse=True, entropy=True), "")
    if "flash+key_mass" in names:
        methods["flash+key_mass"] = (lambda: flash_attention_triton(q, k, v, scaling=scaling, causal=causal,
                                                                    key_mass=True), "reads K twice")
    if "sdpa" in names:
        methods["sdpa"] = _sdpa(q, k, v, scaling, causal)
    if "flex" in names:
        methods["flex"] = (_flex(case, q, k, v, scaling, causal, compiled=not smoke),
                           "" if not smoke else "not compiled (smoke)")
    if "eager" in names:
        methods["eager"] = (_eager(q, k, v, scaling, causal), "weights materialized")
    return methods


def _sdpa(q, k, v, scaling, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    # is_causal in SDPA aligns the mask top-left; for Q == K (prefill) that is the usual causal mask
    def attend(keys, values, gqa):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=scaling, enable_gqa=gqa)
    try:
        attend(k, v, True)
        return (lambda: attend(k, v, True)), ""
    except RuntimeError:  # a flash backend without GQA: give it K/V per query head, expanded outside the timing
        groups = q.shape[1] // k.shape[1]
        keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return (lambda: attend(keys, values, False)), "K/V pre-expanded (no GQA in this backend)"


def _flex(case, q, k, v, scaling, causal, compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if causal:
        offset = case.k_len - case.q_len
        block_mask = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, case.q_len, case.k_len,
                                       device=q.device)
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda: flex(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True)


def _eager(q, k, v, scaling, causal):
    """What transformers' eager attention does with output_attentions: the weights exist as a tensor."""
    groups = q.shape[1] // k.shape[1]

    def run():
        keys = k.repeat_interleave(groups, 1)
        values = v.repeat_interleave(groups, 1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling
        if causal:
            q_len, k_len = scores.shape[-2:]
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, values), weights
    return run


# -- measuring ------------------------------------------------------------------------------------------------

def measure(fn, device: torch.device) -> tuple[float | None, float | None, str]:
    """(median ms, peak bytes above the current allocation, note); an OOM or failure is reported, not raised."""
    try:
        if device.type != "cuda":  # --smoke on CPU: a plain timer, two calls after a warm-up
            fn()
            times = []
            for _ in range(2):
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
            return statistics.median(times), None, ""
        import triton.testing

        fn()  # compile (Triton JIT, torch.compile) outside the timing
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), peak, ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, "OOM"
    except Exception as error:  # a peer that cannot run this shape: say so and keep going
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def run_case(case: Case, names, device, smoke) -> list[dict]:
    from workbench.kernels.flash_attention import flops

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=case.dtype)

    q = randn(case.batch, case.heads, case.q_len, case.head_dim)
    k = randn(case.batch, case.kv_heads, case.k_len, case.head_dim)
    v = randn(case.batch, case.kv_heads, case.k_len, case.head_dim)
    work = flops(case.batch, case.heads, case.q_len, case.k_len, case.head_dim, causal=case.kind == "prefill")
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    first = None
    for name, (fn, note) in build_methods(case, q, k, v, names, smoke).items():
        try:  # every method must compute the same attention, or the comparison means nothing
            out = _bhqd(fn())
            first = out if first is None else first
            error = (out.float() - first.float()).abs().max().item()
        except Exception:
            error = None  # measure() reports the failure
        ms, peak, failure = measure(fn, device)
        row = {"case": case.label, "kind": case.kind, "method": name, "ms": ms, "max_diff": error,
               "note": "; ".join(x for x in (failure, note) if x), "peak_mib": None if peak is None else peak / 2**20}
        if ms is not None:
            row["tflops"] = work / (ms * 1e-3) / 1e12
            if case.kind == "decode":
                row["gb_s"] = kv_bytes / (ms * 1e-3) / 1e9
                row["hbm_pct"] = 100 * kv_bytes / (ms * 1e-3) / HBM_BYTES_PER_S
        rows.append(row)
    return rows


def _bhqd(result) -> torch.Tensor:
    """Any method's output as (B, H, Q, D)."""
    if isinstance(result, tuple):  # eager: (output, weights)
        return result[0]
    if hasattr(result, "output"):  # FlashOutput: (B, Q, H, D)
        return result.output.transpose(1, 2)
    return result


def ratios(rows: list[dict]) -> str:
    ms = {r["method"]: r["ms"] for r in rows if r["ms"] is not None}
    parts = []
    for label, top, bottom in (("flash/sdpa", "flash", "sdpa"), ("flash+entropy/flash", "flash+entropy", "flash"),
                               ("flash+key_mass/flash", "flash+key_mass", "flash"), ("flash/flex", "flash", "flex")):
        if top in ms and bottom in ms:
            parts.append(f"{label} {ms[top] / ms[bottom]:.2f}")
    return "time ratios: " + (", ".join(parts) if parts else "-")


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<28} {'method':<15} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%HBM':>5} {'peak MiB':>9} "
          f"{'max|diff|':>9}  note")
    for r in rows:
        def fmt(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        print(f"{r['case']:<28} {r['method']:<15} {fmt('ms', '.3f'):>9} {fmt('tflops', '.1f'):>8} "
              f"{fmt('gb_s', '.0f'):>7} {fmt('hbm_pct', '.0f'):>5} {fmt('peak_mib', '.1f'):>9} "
              f"{fmt('max_diff', '.1e'):>9}  {r['note']}")


# -- correctness on the GPU -----------------------------------------------------------------------------------

def check(device) -> None:
    """Assert the kernel matches the reference for a few shapes and options, bf16 included (on CPU, under
    --smoke: two tiny float32/float16 shapes, since the interpreter computes bf16 dots wrongly)."""
    from workbench.kernels import flash_attention_reference, flash_attention_triton

    shapes = [  # (batch, heads, kv_heads, q_len, k_len, head_dim, dtype, options)
        (1, 32, 8, 1000, 1000, 128, torch.bfloat16, {}),
        (2, 32, 8, 1, 20000, 128, torch.bfloat16, {}),
        (2, 32, 8, 4, 3000, 128, torch.bfloat16, dict(window=512, sinks=4)),
        (1, 9, 3, 333, 700, 64, torch.float16, dict(window=100, sinks=4)),
        (1, 8, 8, 300, 300, 64, torch.float32, {}),
        (1, 32, 8, 256, 2048, 128, torch.bfloat16, "block_mask"),
    ]
    if device.type != "cuda":
        shapes = [(1, 4, 2, 20, 40, 64, torch.float32, dict(window=16, sinks=2)),
                  (1, 4, 2, 1, 70, 64, torch.float16, {})]
    generator = torch.Generator(device=device).manual_seed(1)
    for batch, heads, kv_heads, q_len, k_len, head_dim, dtype, options in shapes:
        q, k, v = (torch.randn(batch, h, n, head_dim, generator=generator, device=device).to(dtype)
                   for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
        if options == "block_mask":
            options = dict(block_size=64, block_mask=torch.rand(1, heads, -(-q_len // 64), -(-k_len // 64),
                                                                generator=generator, device=device) < 0.5)
        stats = dict(lse=True, entropy=True, key_mass=True)
        got = flash_attention_triton(q, k, v, scaling=head_dim ** -0.5, **options, **stats)
        want = flash_attention_reference(q, k, v, scaling=head_dim ** -0.5, **options, **stats)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.output.float(), want.output.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got.lse, want.lse, atol=tol, rtol=1e-3)
        torch.testing.assert_close(got.entropy, want.entropy, atol=tol, rtol=tol)
        torch.testing.assert_close(got.key_mass, want.key_mass, atol=5 * tol, rtol=tol)
        print(f"check ok: B={batch} H={heads}/{kv_heads} Q={q_len} K={k_len} D={head_dim} "
              f"{str(dtype).removeprefix('torch.')} {sorted(options)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("error: bench/attention.py measures GPU kernels and needs a CUDA device; "
                 "use --smoke to check the script on CPU with tiny shapes")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before workbench.kernels defines its kernels
        warnings.simplefilter("ignore")  # the interpreter's inf arithmetic, uncompiled flex: noise for a smoke run
    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        sys.exit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    device = torch.device("cuda" if cuda else "cpu")
    import triton

    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: timings mean nothing)"
    print(f"{where}, torch {torch.__version__}, triton {triton.__version__}")
    if args.check:
        check(device)
    rows = []
    for case in make_cases(args):
        case_rows = run_case(case, names, device, args.smoke)
        rows += case_rows
        print_table(case_rows)
        print(f"  {ratios(case_rows)}\n")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
