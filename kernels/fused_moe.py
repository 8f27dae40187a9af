"""Fused mixture-of-experts feed-forward: out[t] = sum_j w[t, j] * down_e(SiLU(gate_e(x_t)) * up_e(x_t)), e the
j-th expert chosen for token t, with every expert's rows run as one grouped GEMM instead of a loop over experts.

Inputs are what transformers passes an experts module (MixtralExperts, Qwen3MoeExperts, the workbench's
MoefiedExperts): hidden (T, H), gate_up_proj (E, 2I, H) with the gate rows first and the up rows second (`chunk(2)`),
down_proj (E, H, I), top_k_index (T, k) and top_k_weights (T, k). Pair p = t * k + j is token t's j-th choice.

The algorithm follows vLLM's Triton fused_moe (vllm/model_executor/layers/fused_moe/fused_moe.py, also in SGLang),
whose grouped GEMM is the MegaBlocks idea (Gale et al. 2022: block-sparse GEMMs over variable-size expert groups,
no token dropping, no capacity factor):
  1. Alignment (`moe_align_block_size`): sort the T*k pairs by expert (stable: token order within an expert), pad
     each expert's group to a multiple of BLOCK_M with the dummy pair id T*k, and record for every BLOCK_M block of
     the sorted list which expert it belongs to. Experts without tokens get no blocks. The buffers are sized for the
     worst case (T*k + min(T*k, E) * (BLOCK_M - 1) rows) so nothing waits on the GPU: programs whose block lies past
     the padded count (a 1-element device tensor) return at once.
  2. Gate/up GEMM: program (block, n-tile) loads its expert id, gathers the hidden rows of its BLOCK_M pairs
     (row = pair // k; dummy rows are masked to 0), and multiplies them by that expert's gate rows n..n+BLOCK_N and,
     in the same K loop, by the matching up rows I+n..; the epilogue writes SiLU(gate) * up (fp32, rounded once)
     into an intermediate (T*k, I) at row = pair.
  3. Down GEMM: the same kernel with k = 1 (row = pair), the down weights, and the routing weight multiplied into
     the fp32 accumulator before the store; rows are scattered to a (T*k, H) buffer at row = pair.
  4. The k slots of each token are summed by torch (`view(T, k, H).sum(1)`, fp32 accumulation, deterministic; no
     atomics). k = 1 needs no sum.

Departures from vLLM / SGLang:
  - SiLU(gate) * up is fused into the gate/up GEMM's epilogue (each program keeps a gate and an up accumulator), so
    the (T*k, 2I) gate/up activations are never written; vLLM writes them and runs a separate silu_and_mul.
  - The alignment is a few torch ops (stable sort, cumsum, searchsorted), not a CUDA kernel; the final sum is torch
    (vLLM: its moe_sum op). No quantized weights (fp8/int8/int4), no tuned config files: block sizes come from
    `_config` (rows per expert), untuned. Expert-parallel sentinel ids (>= E, transformers' EP) are clamped with
    weight 0, as transformers' batched_mm does (computed, then dropped), not skipped as vLLM's expert map does.
  - The range of top_k_index is checked (one host sync per call, skipped while a CUDA graph is captured;
    check_indices=False skips it): an id outside [0, E) is a ParameterError, not a silent out-of-bounds read.
  - Optional per-expert biases (added in the epilogue) and transposed weights (read through strides), so any
    transformers layout `use_experts_implementation` allows runs the kernel: for experts whose activation is not
    SiLU or that override `_apply_gate` (interleaved gate/up, clamped SwiGLU), the gate/up GEMM writes the raw
    (T*k, 2I) projection and the module's own `_apply_gate` / `act_fn` runs in torch; a post-expert norm runs in
    torch before the routing weights.
  - No backward: with autograd recording (a tensor that requires grad under grad mode), the torch path runs, with a
    one-time warning.

`register()` (run on import of workbench.kernels) adds the forward to transformers' ExpertsInterface as
"workbench_fused_moe": `model.set_experts_implementation("workbench_fused_moe")`, `from_pretrained(...,
experts_implementation="workbench_fused_moe")` or `config._experts_implementation = "workbench_fused_moe"`. For a
MoEfied model (wb.moefy) only the last works: transformers' set_experts_implementation decides from the model
class's source whether it may switch, and LlamaForCausalLM's has no `@use_experts_implementation`.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from workbench.errors import ParameterError
from workbench.kernels.dispatch import HAS_TRITON, interpreting, use_triton

IMPLEMENTATION = "workbench_fused_moe"  # the name in transformers' ExpertsInterface
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, bias_ptr, routing_ptr, sorted_ids_ptr, block_experts_ptr,
                         padded_ptr, N, K, num_pairs, num_blocks,
                         stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
                         stride_be, stride_bn,
                         A_TOP_K: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
                         MUL_ROUTING: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[pair, n] = sum_k A[pair // A_TOP_K, k] * W[e, n, k] (+ bias[e, n]) (* routing[pair]) for the BLOCK_M
        pairs of one block (all of expert e) and one BLOCK_N tile of n. With SWIGLU the program also accumulates
        W[e, N + n, k] (the up rows) and stores SiLU(gate) * up. Dummy pairs (id == num_pairs) load zeros and
        store nothing."""
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n  # GROUP_M consecutive blocks (mostly one expert) share weight tiles in L2
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        if pid_m * BLOCK_M >= tl.load(padded_ptr):
            return  # a block past the experts' padded groups: nothing to do

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        live = pair < num_pairs
        expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = a_ptr + (pair // A_TOP_K).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            up_ptrs = w_ptrs + N * stride_wn
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if SWIGLU:
                u = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
                up_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

        if HAS_BIAS:
            bias_ptrs = bias_ptr + expert * stride_be + cols * stride_bn
            acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc_up += tl.load(bias_ptrs + N * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_ROUTING:
            acc *= tl.load(routing_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=live[:, None] & col_ok[None, :])


# -- alignment ------------------------------------------------------------------------------------------------

@dataclass
class Alignment:
    """The pairs (token, slot) sorted by expert, each expert's group padded to a multiple of block_m."""
    sorted_ids: torch.Tensor  # (num_blocks * block_m,) int32 pair ids grouped by expert; num_pairs marks padding
    block_experts: torch.Tensor  # (num_blocks,) int32 expert of each block; -1 past the padded count
    padded: torch.Tensor  # (1,) int32 rows in use (a multiple of block_m); blocks at or past it are idle
    num_pairs: int  # tokens * k
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_experts.numel()


def moe_align_block_size(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs of `top_k_index` (T, k) by expert and pad every expert's group to a multiple of block_m
    (vLLM's moe_align_block_size, in torch ops that never wait on the device). Within an expert, pairs stay in
    token order; experts with no pairs get no blocks."""
    device = top_k_index.device
    flat = top_k_index.reshape(-1).long()
    num_pairs = flat.numel()
    num_blocks = -(-(num_pairs + min(num_pairs, num_experts) * (block_m - 1)) // block_m)  # the worst case
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    order = torch.sort(flat, stable=True).indices  # pair ids, grouped by expert
    experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[experts]
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[(padded_ends - padded_counts)[experts] + rank] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_ends, starts, right=True)  # the group each block starts in
    padded = padded_ends[-1:] if num_experts else torch.zeros(1, dtype=torch.long, device=device)
    block_experts = torch.where(starts < padded, block_experts, -1).to(torch.int32)
    return Alignment(sorted_ids, block_experts, padded.to(torch.int32), num_pairs, block_m)


# -- input checks ---------------------------------------------------------------------------------------------

def check_inputs(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up_bias=None, down_bias=None,
                 transposed: bool = False, check_indices: bool = True) -> None:
    """Raise ParameterError naming what is wrong and what is allowed."""
    if hidden.dim() != 2:
        raise ParameterError(f"hidden must be (tokens, hidden); got {tuple(hidden.shape)}")
    tokens, hidden_dim = hidden.shape
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ParameterError("gate_up_proj and down_proj must be 3-D (experts, out, in); "
                             f"got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    experts = gate_up_proj.shape[0]
    two_i, in_dim = (gate_up_proj.shape[2], gate_up_proj.shape[1]) if transposed else gate_up_proj.shape[1:]
    layout = "(experts, hidden, 2*intermediate)" if transposed else "(experts, 2*intermediate, hidden)"
    if in_dim != hidden_dim or two_i % 2 or two_i == 0:
        raise ParameterError(f"gate_up_proj must be {layout} with hidden={hidden_dim}; got {tuple(gate_up_proj.shape)}")
    inter = two_i // 2
    want_down = (experts, inter, hidden_dim) if transposed else (experts, hidden_dim, inter)
    if tuple(down_proj.shape) != want_down:
        raise ParameterError(f"down_proj must be {want_down} for gate_up_proj {tuple(gate_up_proj.shape)}; "
                             f"got {tuple(down_proj.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise ParameterError(f"top_k_index and top_k_weights must both be (tokens={tokens}, k); "
                             f"got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool or top_k_index.is_complex():
        raise ParameterError(f"top_k_index must be an integer tensor; got {top_k_index.dtype}")
    if not top_k_weights.dtype.is_floating_point:
        raise ParameterError(f"top_k_weights must be a floating-point tensor; got {top_k_weights.dtype}")
    if hidden.dtype not in DTYPES or gate_up_proj.dtype != hidden.dtype or down_proj.dtype != hidden.dtype:
        raise ParameterError("hidden, gate_up_proj and down_proj must share one dtype of float16, bfloat16, "
                             f"float32; got {hidden.dtype}, {gate_up_proj.dtype}, {down_proj.dtype}")
    for name, bias, size in (("gate_up_bias", gate_up_bias, two_i), ("down_bias", down_bias, hidden_dim)):
        if bias is not None and tuple(bias.shape) != (experts, size):
            raise ParameterError(f"{name} must be (experts={experts}, {size}); got {tuple(bias.shape)}")
    tensors = [hidden, gate_up_proj, down_proj, top_k_index, top_k_weights]
    tensors += [b for b in (gate_up_bias, down_bias) if b is not None]
    if len({t.device for t in tensors}) > 1:
        raise ParameterError(f"all inputs must be on one device; got {sorted({str(t.device) for t in tensors})}")
    if check_indices:
        _check_range(top_k_index, experts, hidden)


def _check_range(top_k_index: torch.Tensor, experts: int, like: torch.Tensor) -> None:
    """Expert ids in [0, experts): one host sync, skipped while a CUDA graph is being captured."""
    if top_k_index.numel() == 0 or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = torch.aminmax(top_k_index)
    low, high = torch.stack([low, high]).tolist()
    if low < 0 or high >= experts:
        raise ParameterError(f"top_k_index must lie in [0, {experts}) (num_experts={experts}); "
                             f"got values in [{low}, {high}]")


# -- reference ------------------------------------------------------------------------------------------------

def fused_moe_reference(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, *, gate_up_bias=None,
                        down_bias=None, transposed: bool = False, check_indices: bool = True) -> torch.Tensor:
    """The same function in plain torch: a loop over the experts that have tokens, float32 math, index_add into
    the tokens' rows; the result in hidden's dtype. Differentiable."""
    check_inputs(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up_bias, down_bias, transposed,
                 check_indices)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1).float()
    k = top_k_index.shape[1]
    for expert in torch.unique(flat).tolist():
        pairs = (flat == expert).nonzero().squeeze(1)
        tokens = pairs // k
        w1, w2 = gate_up_proj[expert].float(), down_proj[expert].float()
        if transposed:
            w1, w2 = w1.t(), w2.t()
        h = hidden[tokens].float() @ w1.t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[expert].float()
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2.t()
        if down_bias is not None:
            y = y + down_bias[expert].float()
        out = out.index_add(0, tokens, y * weights[pairs, None])
    return out.to(hidden.dtype)


# -- kernel launch --------------------------------------------------------------------------------------------

@dataclass
class Config:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _config(num_pairs: int, num_experts: int, dtype: torch.dtype, swiglu: bool, block_m=None, block_n=None,
            block_k=None) -> Config:
    """Tiles from the mean rows per expert (untuned heuristics in the spirit of vLLM's default config): 16-row
    blocks for decoding (a token per expert or so: the weights dominate), up to 128 for long prefills."""
    rows = num_pairs / max(1, num_experts)
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 128 else 128
    bn = 64 if bm <= 32 or swiglu else 128  # SwiGLU keeps two accumulators and two weight tiles
    bk = 32 if dtype == torch.float32 else 64
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ParameterError(f"{name} must be a power of two >= 16; got {value}")
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 2 if dtype == torch.float32 else 3
    return Config(bm, bn, bk, 8 if bm >= 64 else 1, warps, stages)


def moe_gemm(a: torch.Tensor, weight: torch.Tensor, align: Alignment, *, out_features: int, a_top_k: int,
             config: Config, transposed: bool = False, swiglu: bool = False, bias: torch.Tensor | None = None,
             routing: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One grouped GEMM over the aligned pairs: (num_pairs, out_features), row p from row p // a_top_k of `a`
    times its expert's weight (E, out, in) (or (E, in, out) if transposed). swiglu: out_features = I and the
    weight holds 2I outputs [gate; up]; stores SiLU(gate) * up. routing: (num_pairs,) weights multiplied in."""
    out = torch.empty(align.num_pairs, out_features, dtype=out_dtype or a.dtype, device=a.device)
    if align.num_pairs == 0 or out_features == 0:
        return out
    stride_we, stride_wn, stride_wk = weight.stride()
    if transposed:
        stride_wn, stride_wk = stride_wk, stride_wn
    anything = out  # a valid pointer for the arguments a specialization never reads
    grid = (align.num_blocks * triton.cdiv(out_features, config.block_n),)
    with torch.cuda.device(a.device) if a.is_cuda else nullcontext():
        _moe_gemm_kernel[grid](
            a, weight, out, bias if bias is not None else anything, routing if routing is not None else anything,
            align.sorted_ids, align.block_experts, align.padded, out_features, a.shape[1], align.num_pairs,
            align.num_blocks, a.stride(0), a.stride(1), stride_we, stride_wn, stride_wk, out.stride(0),
            out.stride(1), *(bias.stride() if bias is not None else (0, 0)),
            A_TOP_K=a_top_k, SWIGLU=swiglu, HAS_BIAS=bias is not None, MUL_ROUTING=routing is not None,
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
            num_stages=config.num_stages)
    return out


def fused_moe_triton(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, *, gate_up_bias=None,
                     down_bias=None, transposed: bool = False, check_indices: bool = True, block_m: int | None = None,
                     block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Always the Triton kernels (align, gate/up GEMM with SwiGLU, down GEMM with the routing weights, torch sum
    over k). block_m / block_n / block_k override the tiling (tests, tuning). No autograd."""
    check_inputs(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up_bias, down_bias, transposed,
                 check_indices)
    if not HAS_TRITON:
        raise RuntimeError("fused_moe_triton needs Triton (pip install triton)")
    tokens, hidden_dim = hidden.shape
    k = top_k_index.shape[1]
    experts = gate_up_proj.shape[0]
    inter = (gate_up_proj.shape[2] if transposed else gate_up_proj.shape[1]) // 2
    if tokens == 0 or k == 0:
        return torch.zeros_like(hidden)
    config = _config(tokens * k, experts, hidden.dtype, True, block_m, block_n, block_k)
    align = moe_align_block_size(top_k_index, experts, config.block_m)
    h = moe_gemm(hidden, gate_up_proj, align, out_features=inter, a_top_k=k, config=config, transposed=transposed,
                 swiglu=True, bias=gate_up_bias)
    down_config = _config(tokens * k, experts, hidden.dtype, False, config.block_m, block_n, block_k)
    y = moe_gemm(h, down_proj, align, out_features=hidden_dim, a_top_k=1, config=down_config,
                 transposed=transposed, bias=down_bias, routing=top_k_weights.reshape(-1).contiguous())
    return y if k == 1 else y.view(tokens, k, hidden_dim).sum(dim=1)


# -- dispatch -------------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _kernel_applies(t: torch.Tensor, name: str, tensors) -> bool:
    """Triton for CUDA tensors, and for CPU tensors under the Triton interpreter (tests); never when autograd
    records (no backward), which is said once."""
    if not (use_triton(t, name) or (HAS_TRITON and interpreting() and t.device.type == "cpu")):
        return False
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"{name} has no backward: with autograd recording it runs the torch path; run inference "
                          "under torch.no_grad() or torch.inference_mode() for the kernel", RuntimeWarning,
                          stacklevel=3)
        return False
    return True


def fused_moe(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, *, gate_up_bias=None, down_bias=None,
              transposed: bool = False, check_indices: bool = True) -> torch.Tensor:
    """sum_j top_k_weights[t, j] * down_e(SiLU(gate_e(x_t)) * up_e(x_t)) for every token t (e = top_k_index[t, j]):
    the Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1), the torch reference elsewhere.
    check_indices=False skips the range check of top_k_index (a host sync; skipped anyway under CUDA graphs)."""
    options = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, transposed=transposed,
                   check_indices=check_indices)
    if _kernel_applies(hidden, "fused_moe", (hidden, gate_up_proj, down_proj, top_k_weights, gate_up_bias,
                                             down_bias)):
        return fused_moe_triton(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, **options)
    return fused_moe_reference(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, **options)


# -- transformers' ExpertsInterface ---------------------------------------------------------------------------

def _is_silu(act_fn) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act_fn, (torch.nn.SiLU, SiLUActivation)) or act_fn is F.silu


def _default_gate(module) -> bool:
    from transformers.integrations import moe

    return getattr(type(module), "_apply_gate", None) is moe._default_apply_gate


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward registered as "workbench_fused_moe" for any `@use_experts_implementation` experts module.
    SwiGLU experts with SiLU and the default [gate; up] split run the fused kernels; other gates / activations,
    biases, transposed weights and a post-expert norm run the same grouped GEMMs with those steps in torch. Off
    CUDA (without the interpreter) and under autograd it is transformers' "grouped_mm" forward."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    w2 = self.down_proj
    prefix = "gate_up_proj" if self.has_gate else "up_proj"
    b1 = getattr(self, f"{prefix}_bias") if self.has_bias else None
    b2 = self.down_proj_bias if self.has_bias else None
    if not _kernel_applies(hidden_states, IMPLEMENTATION, (hidden_states, w1, w2, top_k_weights, b1, b2)):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    tokens, hidden_dim = hidden_states.shape
    k = top_k_index.shape[-1]
    x = hidden_states.to(w1.dtype)
    if self._is_expert_parallel:  # sentinel ids (>= num_experts) contribute nothing, as in batched_mm
        sentinel = top_k_index >= self.num_experts
        top_k_index = top_k_index.clamp(0, self.num_experts - 1)
        top_k_weights = top_k_weights.masked_fill(sentinel, 0.0)
    transposed = bool(self.is_transposed)
    fused = self.has_gate and _is_silu(self.act_fn) and _default_gate(self)
    if fused and not self.has_post_expert_norm:
        return fused_moe_triton(x, w1, w2, top_k_index, top_k_weights, gate_up_bias=b1, down_bias=b2,
                                transposed=transposed).to(hidden_states.dtype)
    if tokens == 0 or k == 0:
        return torch.zeros_like(hidden_states)
    _check_module_shapes(self, x, w1, w2, top_k_index, top_k_weights, transposed)
    experts = w1.shape[0]
    proj = w1.shape[2] if transposed else w1.shape[1]  # 2I with a gate, I without
    config = _config(tokens * k, experts, x.dtype, fused, None, None, None)
    align = moe_align_block_size(top_k_index, experts, config.block_m)
    if fused:
        h = moe_gemm(x, w1, align, out_features=proj // 2, a_top_k=k, config=config, transposed=transposed,
                     swiglu=True, bias=b1)
    else:
        h = moe_gemm(x, w1, align, out_features=proj, a_top_k=k, config=config, transposed=transposed, bias=b1)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    down_config = _config(tokens * k, experts, x.dtype, False, config.block_m, None, None)
    weights = top_k_weights.reshape(-1).contiguous()
    if self.has_post_expert_norm:  # the norm comes between the down projection and the routing weights
        y = moe_gemm(h.contiguous(), w2, align, out_features=hidden_dim, a_top_k=1, config=down_config,
                     transposed=transposed, bias=b2)
        y = self.post_expert_norm(y) * weights[:, None].to(y.dtype)
    else:
        y = moe_gemm(h.contiguous(), w2, align, out_features=hidden_dim, a_top_k=1, config=down_config,
                     transposed=transposed, bias=b2, routing=weights)
    y = y if k == 1 else y.view(tokens, k, hidden_dim).sum(dim=1)
    return y.to(hidden_states.dtype)


def _check_module_shapes(module, x, w1, w2, top_k_index, top_k_weights, transposed) -> None:
    experts = w1.shape[0]
    in_dim = w1.shape[1] if transposed else w1.shape[2]
    if x.dim() != 2 or in_dim != x.shape[1] or w2.shape[0] != experts:
        raise ParameterError(f"{type(module).__name__}: hidden_states {tuple(x.shape)} do not fit the expert weights "
                             f"{tuple(w1.shape)} / {tuple(w2.shape)}")
    if top_k_index.shape != (x.shape[0], top_k_index.shape[-1]) or top_k_weights.shape != top_k_index.shape:
        raise ParameterError(f"top_k_index and top_k_weights must both be (tokens={x.shape[0]}, k); "
                             f"got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    _check_range(top_k_index, experts, x)


def register() -> bool:
    """Add `experts_forward` to transformers' ExpertsInterface as "workbench_fused_moe" (class-wide: every model
    sees it). False when this transformers has no ExpertsInterface."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    return True


__all__ = ["IMPLEMENTATION", "Alignment", "moe_align_block_size", "fused_moe", "fused_moe_reference",
           "fused_moe_triton", "moe_gemm", "experts_forward", "register", "check_inputs"]
