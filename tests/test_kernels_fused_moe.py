"""The fused MoE kernels (kernels/fused_moe.py) against an independent dense float64 computation, and the
"workbench_fused_moe" experts implementation against transformers' own on tiny Mixtral, Qwen3-MoE and MoEfied
models. Runs under the Triton interpreter on CPU (fp32/fp16), compiled on a GPU (bf16 and real shapes too)."""

import sys

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import workbench as wb
from workbench.errors import ParameterError
from workbench.kernels import fused_moe, fused_moe_reference, fused_moe_triton, moe_align_block_size
from workbench.models.tiny import build_tiny

fm = sys.modules["workbench.kernels.fused_moe"]  # the module (the package's attribute of that name is the function)

pytestmark = pytest.mark.interpreter

TILES = dict(block_m=16, block_n=32, block_k=32)  # small tiles: few interpreter steps, masked edges included


def dense_moe(x, w1, w2, index, weights, b1=None, b2=None):
    """For each token, sum over its k experts of weight * down(silu(gate(x)) * up(x)), in float64, with the weights
    as (E, 2I, H) [gate; up] and (E, H, I)."""
    x, w1, w2, weights = x.double(), w1.double(), w2.double(), weights.double()
    inter = w1.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = w1[e] @ x[t] + (0 if b1 is None else b1[e].double())
            gate, up = h[:inter], h[inter:]
            y = w2[e] @ (gate / (1 + torch.exp(-gate)) * up) + (0 if b2 is None else b2[e].double())
            out[t] += weights[t, j] * y
    return out


def problem(tokens, k, experts=4, hidden=48, inter=40, seed=0, allowed=None, dtype=torch.float32, device="cpu"):
    """Random inputs; routing picks k distinct experts per token among `allowed` (default: all)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    x = randn(tokens, hidden)
    w1 = randn(experts, 2 * inter, hidden) / hidden ** 0.5
    w2 = randn(experts, hidden, inter) / inter ** 0.5
    allowed = torch.arange(experts, device=device) if allowed is None else torch.tensor(allowed, device=device)
    index = allowed[torch.rand(tokens, len(allowed), generator=g, device=device).argsort(-1)[:, :k]]
    weights = torch.softmax(randn(tokens, k), -1)
    return x.to(dtype), w1.to(dtype), w2.to(dtype), index, weights


def assert_matches_dense(out, x, w1, w2, index, weights, tol, **biases):
    want = dense_moe(x.cpu(), w1.cpu(), w2.cpu(), index.cpu(), weights.cpu(),
                     **{n: b.cpu() for n, b in biases.items()})
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("tokens", [1, 7, 13])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_matches_dense_computation(tokens, k, dtype, tol, kernel_device):
    x, w1, w2, index, weights = problem(tokens, k, seed=tokens + k, dtype=dtype, device=kernel_device)
    out = fused_moe_triton(x, w1, w2, index, weights, **TILES)
    assert_matches_dense(out, x, w1, w2, index, weights, tol)
    torch.testing.assert_close(out.float(), fused_moe_reference(x, w1, w2, index, weights).float(), atol=tol,
                               rtol=tol)


def test_default_tiles(kernel_device):
    x, w1, w2, index, weights = problem(5, 2, seed=3, device=kernel_device)
    assert_matches_dense(fused_moe_triton(x, w1, w2, index, weights), x, w1, w2, index, weights, 1e-5)


def test_experts_without_tokens_get_no_blocks(kernel_device):
    x, w1, w2, index, weights = problem(9, 2, experts=6, allowed=[1, 4], seed=5, device=kernel_device)
    align = moe_align_block_size(index, 6, 16)
    live = align.block_experts[align.block_experts >= 0].tolist()
    assert live == [1, 4]  # one 16-row block each (9 tokens per expert), none for experts 0, 2, 3, 5
    assert int(align.padded) == 32
    assert_matches_dense(fused_moe_triton(x, w1, w2, index, weights, **TILES), x, w1, w2, index, weights, 1e-5)


def test_alignment_groups_and_pads_by_expert():
    index = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0], [1, 2]])
    align = moe_align_block_size(index, num_experts=4, block_m=4)
    flat, pad = index.reshape(-1), index.numel()
    padded = int(align.padded)
    assert padded == 4 + 4 + 8  # expert 0: 3 pairs, expert 1: 2, expert 2: 5, expert 3: none
    assert align.block_experts.tolist() == [0, 1, 2, 2] + [-1] * (align.num_blocks - 4)
    ids = align.sorted_ids[:padded].view(-1, 4)
    for block, expert in zip(ids, align.block_experts[:4].tolist()):
        real = block[block < pad]
        assert (flat[real.long()] == expert).all()
        assert real.tolist() == sorted(real.tolist())  # token order within an expert
    assert sorted(align.sorted_ids[align.sorted_ids < pad].tolist()) == list(range(pad))  # each pair once
    assert (align.sorted_ids[padded:] == pad).all()


def test_transposed_weights_biases_and_strided_hidden(kernel_device):
    x, w1, w2, index, weights = problem(6, 2, seed=11, device=kernel_device)
    g = torch.Generator().manual_seed(12)
    b1, b2 = (torch.randn(4, n, generator=g).to(kernel_device) for n in (80, 48))
    wide = torch.zeros(6, 96, device=kernel_device)
    wide[:, ::2] = x  # hidden rows with stride 2 along the features
    out = fused_moe_triton(wide[:, ::2], w1.transpose(1, 2).contiguous().transpose(1, 2), w2, index, weights,
                           gate_up_bias=b1, down_bias=b2, **TILES)
    assert_matches_dense(out, x, w1, w2, index, weights, 1e-5, b1=b1, b2=b2)
    # the (E, in, out) layout of transformers' is_transposed experts, read through strides
    out = fused_moe_triton(x, w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), index, weights,
                           gate_up_bias=b1, down_bias=b2, transposed=True, **TILES)
    assert_matches_dense(out, x, w1, w2, index, weights, 1e-5, b1=b1, b2=b2)


def test_clear_errors():
    x, w1, w2, index, weights = problem(3, 2)
    cases = [
        ((x[:, :5], w1, w2, index, weights), {}, r"gate_up_proj must be \(experts, 2\*intermediate, hidden\)"),
        ((x, w1, w2[:, :, :7], index, weights), {}, r"down_proj must be \(4, 48, 40\)"),
        ((x, w1, w2, index[:2], weights[:2]), {}, r"must both be \(tokens=3, k\)"),
        ((x, w1, w2, index + 3, weights), {}, r"top_k_index must lie in \[0, 4\) \(num_experts=4\); got values in"),
        ((x, w1, w2, index - 1, weights), {}, r"top_k_index must lie in \[0, 4\)"),
        ((x, w1, w2, index.float(), weights), {}, "top_k_index must be an integer tensor"),
        ((x.half(), w1, w2, index, weights), {}, "must share one dtype"),
        ((x, w1, w2, index, weights), dict(down_bias=torch.zeros(4, 7)), r"down_bias must be \(experts=4, 48\)"),
    ]
    for args, options, message in cases:
        for function in (fused_moe_triton, fused_moe_reference, fused_moe):
            with pytest.raises(ParameterError, match=message):
                function(*args, **options)
    with pytest.raises(ParameterError, match="block_m must be a power of two >= 16; got 24"):
        fused_moe_triton(x, w1, w2, index, weights, block_m=24)


def test_dispatch(monkeypatch, kernel_device):
    calls = []
    monkeypatch.setattr(fm, "fused_moe_triton", lambda *a, **kw: calls.append(1) or fused_moe_triton(*a, **kw))
    fused_moe(*problem(4, 2, seed=2, device=kernel_device))
    assert calls == [1]  # CUDA tensors, or CPU tensors under the interpreter (as in these tests): the kernel
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w1, w2, index, weights = problem(4, 2, seed=2)
    out = fused_moe(x, w1, w2, index, weights)
    assert calls == [1]  # plain CPU: the reference
    assert_matches_dense(out, x, w1, w2, index, weights, 1e-5)


def test_autograd_runs_the_torch_path(monkeypatch, kernel_device):
    x, w1, w2, index, weights = problem(3, 2, seed=4, device=kernel_device)
    monkeypatch.setattr(fm, "_warned", set())
    x.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="fused_moe has no backward"):
        out = fused_moe(x, w1, w2, index, weights)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# -- transformers' ExpertsInterface ---------------------------------------------------------------------------

MODELS = {
    "mixtral": dict(hidden_size=64, intermediate_size=96),
    "qwen3_moe": dict(hidden_size=64, moe_intermediate_size=48),
}


def _logits(hf, ids, implementation):
    hf.config._experts_implementation = implementation
    with torch.no_grad():
        return hf(ids).logits


def _count_kernel_calls(monkeypatch):
    calls = []
    original = fm.moe_gemm
    monkeypatch.setattr(fm, "moe_gemm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def test_registered_in_the_experts_interface():
    assert ALL_EXPERTS_FUNCTIONS["workbench_fused_moe"] is fm.experts_forward
    assert fm.register()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_tiny_moe_models_match_eager(family, monkeypatch, kernel_device):
    hf = build_tiny(family, seed=1, **MODELS[family]).to(kernel_device)
    ids = torch.randint(3, 300, (1, 13), generator=torch.Generator().manual_seed(0)).to(kernel_device)
    eager = _logits(hf, ids, "eager")
    calls = _count_kernel_calls(monkeypatch)
    fused = _logits(hf, ids, "workbench_fused_moe")
    assert len(calls) == 2 * 2  # gate/up and down in each of the 2 layers
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    hf.set_experts_implementation("grouped_mm")
    hf.set_experts_implementation("workbench_fused_moe")  # transformers' own switch accepts the name
    assert hf.config._experts_implementation == "workbench_fused_moe"


def test_from_config_keyword():
    from transformers import AutoModelForCausalLM

    from workbench.models.tiny import tiny_config

    config = tiny_config("mixtral", num_hidden_layers=1, **MODELS["mixtral"])
    hf = AutoModelForCausalLM.from_config(config, experts_implementation="workbench_fused_moe")
    assert hf.config._experts_implementation == "workbench_fused_moe"


def test_moefied_experts(monkeypatch, kernel_device):
    """MoefiedExperts stores MixtralExperts' layout ([gate; up] (E, 2d, hidden), down (E, hidden, d), the dense
    model's SiLU), so the fused kernels run it unchanged."""
    model = wb.moefy(wb.tiny("llama", hidden_size=64, intermediate_size=128, seed=2), experts=4, top_k=2)
    model.hf.to(kernel_device)
    ids = model.encode("a moefied tiny llama").to(kernel_device)
    eager = _logits(model.hf, ids, "eager")
    calls = _count_kernel_calls(monkeypatch)
    fused = _logits(model.hf, ids, "workbench_fused_moe")
    assert len(calls) == 2 * 2
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def _experts_class(**flags):
    """A tiny experts module with the given `use_experts_implementation` flags (the layouts of other models)."""

    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
            out = 2 * i if flags.get("has_gate", True) else i
            g = torch.Generator().manual_seed(7)
            shape = (e, h, out) if flags.get("is_transposed") else (e, out, h)
            name = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(*shape, generator=g) / h ** 0.5))
            self.down_proj = nn.Parameter(torch.randn(*((e, i, h) if flags.get("is_transposed") else (e, h, i)),
                                                      generator=g) / i ** 0.5)
            if flags.get("has_bias"):
                setattr(self, f"{name}_bias", nn.Parameter(torch.randn(e, out, generator=g)))
                self.down_proj_bias = nn.Parameter(torch.randn(e, h, generator=g))
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = nn.LayerNorm(h)
            self.num_experts = e
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not used: the tests pick an implementation")

    return Experts


class _Clamped:
    """A gpt-oss-like gate that overrides `_apply_gate`: interleaved [g0, u0, g1, u1, ...], clamped."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2].clamp(max=2.0), gate_up[..., 1::2].clamp(-2.0, 2.0)
        return gate * torch.sigmoid(gate * 1.7) * (up + 1)


@pytest.mark.parametrize("flags,act", [
    (dict(is_transposed=True, has_bias=True), "gelu"),
    (dict(has_gate=False), "relu"),
    (dict(has_post_expert_norm=True), "silu"),
    (dict(is_concatenated=False, is_transposed=True, has_bias=True), "clamped"),
    (dict(is_transposed=True, has_bias=True), "silu"),
])
def test_other_expert_layouts_match_batched_mm(flags, act, monkeypatch, kernel_device):
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=4,
                           hidden_act="silu" if act == "clamped" else act)
    cls = _experts_class(**flags)
    if act == "clamped":
        cls = type("ClampedExperts", (_Clamped, cls), {})
    experts = cls(config).eval().to(kernel_device)
    x, _, _, index, weights = problem(7, 2, hidden=32, seed=8, device=kernel_device)
    config._experts_implementation = "batched_mm"
    with torch.no_grad():
        want = experts(x, index, weights)
        config._experts_implementation = "workbench_fused_moe"
        calls = _count_kernel_calls(monkeypatch)
        got = experts(x, index, weights)
    assert calls  # the kernels ran (fused or with the gate in torch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [
    (1, 4096, 14336, 8, 2), (300, 4096, 14336, 8, 2),  # Mixtral-8x7B
    (1, 2048, 768, 128, 8), (1000, 2048, 768, 128, 8),  # Qwen3-30B-A3B
])
def test_bfloat16_real_shapes_on_gpu(tokens, hidden, inter, experts, k):
    x, w1, w2, index, weights = problem(tokens, k, experts=experts, hidden=hidden, inter=inter, seed=tokens,
                                        dtype=torch.bfloat16, device="cuda")
    out = fused_moe_triton(x, w1, w2, index, weights)
    want = fused_moe_reference(x, w1, w2, index, weights)  # float32 math on the same bf16 weights
    scale = want.float().abs().max().item()
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2 * scale, rtol=2e-2)
    torch.testing.assert_close(fused_moe(x, w1, w2, index, weights), out)  # the dispatch picks the kernel


@pytest.mark.gpu
def test_bfloat16_model_matches_grouped_mm_on_gpu():
    hf = build_tiny("qwen3_moe", seed=3, hidden_size=256, moe_intermediate_size=128, num_experts=16,
                    num_experts_per_tok=4).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 300, (2, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grouped = _logits(hf, ids, "grouped_mm").float()
    fused = _logits(hf, ids, "workbench_fused_moe").float()
    assert (fused - grouped).abs().max().item() < 5e-2 * grouped.abs().max().item()
