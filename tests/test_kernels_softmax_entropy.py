"""The fused softmax-entropy kernel against its torch reference and an independent entropy (torch.distributions).
Runs under the Triton interpreter on CPU (fp32/fp16), compiled on a GPU (bf16 too)."""

import pytest
import torch

from workbench.kernels import softmax_entropy, softmax_entropy_reference, softmax_entropy_triton

pytestmark = pytest.mark.interpreter


def independent_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits.double()).entropy()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 1000), (4, 1025), (2, 3, 333)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_matches_reference_and_independent_entropy(shape, dtype, tol, kernel_device):
    generator = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=generator) * 4).to(dtype).to(kernel_device)
    lse, entropy = softmax_entropy_triton(logits, block=256)
    ref_lse, ref_entropy = softmax_entropy_reference(logits)
    assert lse.shape == entropy.shape == shape[:-1]
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, ref_entropy, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(entropy.double().cpu(), independent_entropy(logits.float().cpu()), atol=tol * 10,
                               rtol=tol)
    torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(logits.double().cpu(), -1), atol=tol, rtol=tol)


def test_masked_and_peaked_rows(kernel_device):
    logits = torch.randn(4, 600) * 3
    logits[0, :599] = float("-inf")  # one live token: entropy 0, lse = that logit
    logits[1, ::2] = float("-inf")  # half the vocabulary filtered out
    logits[2] = 0.0  # uniform: entropy log(600)
    logits[3, 17] = 80.0  # nearly one-hot
    logits = logits.to(kernel_device)
    lse, entropy = softmax_entropy_triton(logits, block=128)
    assert entropy[0].item() == pytest.approx(0.0, abs=1e-6)
    assert lse[0].item() == pytest.approx(logits[0, 599].item(), abs=1e-5)
    assert entropy[2].item() == pytest.approx(torch.log(torch.tensor(600.0)).item(), abs=1e-5)
    assert entropy[3].item() < 1e-6
    torch.testing.assert_close(entropy.cpu().double(), independent_entropy(logits.cpu()), atol=1e-5, rtol=1e-5)


def test_strided_input(kernel_device):
    base = torch.randn(300, 6).to(kernel_device)
    logits = base.t()  # rows with stride 1 along dim 0 of base: the launcher must make them contiguous
    torch.testing.assert_close(softmax_entropy_triton(logits)[1], softmax_entropy_reference(logits)[1])


def test_dispatch_uses_reference_on_cpu():
    logits = torch.randn(2, 50)
    lse, entropy = softmax_entropy(logits)
    torch.testing.assert_close(entropy.double(), independent_entropy(logits), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_bfloat16_on_gpu():
    logits = (torch.randn(8, 49152, device="cuda") * 3).bfloat16()
    lse, entropy = softmax_entropy_triton(logits)
    ref_lse, ref_entropy = softmax_entropy_reference(logits)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-3, rtol=1e-3)
