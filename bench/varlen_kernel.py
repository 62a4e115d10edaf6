"""The packed-row attention kernels side by side on one GPU: same numbers, and their cost a call.

    python3 -m bench.varlen_kernel [--tokens 4096] [--heads 32] [--kv_heads 8] [--head_dim 64]

Compares pipeline/model/attention.py's `_torch_varlen` (PyTorch's public varlen op, kv heads
repeated for grouped-query attention) and a candidate defined here, `_flash_varlen` (the flash
kernel called directly, kv heads read in place; it replaces the public op only once this shows it
equal and cheaper) against the per-sample SDPA reference: outputs and the three gradients, then
milliseconds a forward+backward on a full row and on a short one (where the host's launch cost
shows), and whether each compiles as one graph. Prints one JSON object. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.model import attention

KERNELS = {
    "torch_varlen": attention._torch_varlen,
    "flash_varlen": attention._flash_varlen,
}


def packed_inputs(tokens: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """q, k, v (tokens, heads, dim) in bf16 with gradients, and the bounds of random samples."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(1, tokens, (max(tokens // 600, 1),), generator=gen).tolist())
    bounds = sorted({0, *cuts, tokens})
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    shapes = [(tokens, heads, dim), (tokens, kv_heads, dim), (tokens, kv_heads, dim)]
    q, k, v = (
        torch.randn(s, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for s in shapes
    )
    return q, k, v, cu, longest


def run_once(fn, q, k, v, cu, longest, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, cu, longest, q.shape[-1] ** -0.5)
    out.backward(grad)
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


def timed(fn, inputs, grad, calls: int) -> float:
    """Milliseconds a forward+backward, GPU drained at both ends."""
    for _ in range(3):
        run_once(fn, *inputs, grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run_once(fn, *inputs, grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / calls


def compiles_whole(fn, inputs, grad) -> str:
    torch._dynamo.reset()
    try:
        run_once(torch.compile(fn, fullgraph=True, dynamic=True), *inputs, grad)
        return "one graph"
    except Exception as exc:  # what dynamo says is the finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    shape = (args.heads, args.kv_heads, args.head_dim)
    full = packed_inputs(args.tokens, *shape)
    short = packed_inputs(256, *shape, seed=1)
    grad_full, grad_short = (torch.randn_like(x[0]) for x in (full, short))
    ref_out, ref_grads = run_once(attention.reference_varlen, *full, grad_full)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    for name, fn in KERNELS.items():
        out, grads = run_once(fn, *full, grad_full)
        report[name] = {
            "max_abs_diff_vs_sdpa": {
                part: float((a - b).abs().max())
                for part, a, b in zip(
                    ("out", "dq", "dk", "dv"), [out, *grads], [ref_out, *ref_grads]
                )
            },
            "ms_fwd_bwd_full_row": round(timed(fn, full, grad_full, args.calls), 4),
            "ms_fwd_bwd_256_tokens": round(timed(fn, short, grad_short, args.calls), 4),
            "compile": compiles_whole(fn, full, grad_full),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
