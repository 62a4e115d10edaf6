"""The packed-row attention kernel (pipeline/model/attention.py): on a CUDA GPU the flash kernel
called directly, grouped-query kv heads read in place, must give the per-sample SDPA reference's
output and gradients. The CPU tests of the glue around it run with the reference as the kernel
(tests/test_sample_packing.py, tests/test_pair_packing.py); these run where a GPU is (measured:
bench/results/h100-2026-12-05c-sft, the same differences as PyTorch's public varlen op)."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel is CUDA's")


def test_the_flash_kernel_is_the_packed_rows_kernel():
    assert attention.KERNEL["fn"] is attention._flash_varlen


@needs_cuda
@pytest.mark.parametrize("kv_heads", [8, 32])  # grouped-query and plain multi-head
def test_flash_varlen_equals_the_per_sample_reference(kv_heads):
    from bench.varlen_kernel import packed_inputs, run_once

    q, k, v, cu, longest = packed_inputs(2048, 32, kv_heads, 64)
    grad = torch.randn_like(q)
    out, grads = run_once(attention._flash_varlen, q, k, v, cu, longest, grad)
    ref_out, ref_grads = run_once(attention.reference_varlen, q, k, v, cu, longest, grad)
    public_out, public_grads = run_once(attention._torch_varlen, q, k, v, cu, longest, grad)
    for mine, ref, public in zip([out, *grads], [ref_out, *ref_grads], [public_out, *public_grads]):
        # no further from the reference than PyTorch's own op (bf16 rounding of the same sums)
        assert (mine - ref).abs().max() <= (public - ref).abs().max() * 1.5 + 1e-3


@needs_cuda
def test_flash_varlen_keeps_a_sliding_window():
    import functools

    from bench.varlen_kernel import packed_inputs, run_once

    q, k, v, cu, longest = packed_inputs(2048, 32, 8, 64)
    grad = torch.randn_like(q)
    windowed = functools.partial(attention._flash_varlen, window=128)
    out, grads = run_once(windowed, q, k, v, cu, longest, grad)
    reference = functools.partial(attention.reference_varlen, window=128)
    ref_out, ref_grads = run_once(reference, q, k, v, cu, longest, grad)
    full_out, _ = run_once(attention.reference_varlen, q, k, v, cu, longest, grad)
    assert (full_out - ref_out).abs().max() > 0.05  # the window changes the output here
    for mine, ref in zip([out, *grads], [ref_out, *ref_grads]):
        assert (mine - ref).abs().max() <= 0.1, (mine - ref).abs().max()
