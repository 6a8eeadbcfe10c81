"""Peak GPU memory of one forward + backward, against the bytes the tensors themselves need
(inputs, output, lse, gradients): what is left is the kernels' own workspace.
python benchmarks/peak_memory.py [--batch 1 --heads 16 --seqlen 16384 --head-dim 128]"""
import argparse

import torch

from bench_attention import import_cuflash_attn, mib, peak_mib


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()
    cuflash_attn = import_cuflash_attn()
    shape = (a.batch, a.heads, a.seqlen, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step():
        out = cuflash_attn.flash_attention(q, k, v, causal=a.causal)
        torch.autograd.grad(out, (q, k, v), dout)

    peak = peak_mib(step)
    elems = q.numel()
    # out, dq, dk, dv in bf16 and lse in fp32
    tensors = mib(4 * elems * 2 + a.batch * a.heads * a.seqlen * 4)
    print(f"shape {shape} bf16 causal={a.causal}")
    print(f"inputs q, k, v, dout (held before): {mib(4 * elems * 2):.1f} MiB")
    print(f"out + lse + dq + dk + dv:            {tensors:.1f} MiB")
    print(f"peak above the inputs:               {peak:.1f} MiB")
    print(f"workspace beyond those tensors:      {peak - tensors:.1f} MiB")

if __name__ == "__main__":
    main()
