"""Peak GPU memory of one forward + backward, against the bytes the tensors themselves need
(inputs, output, lse, gradients): what is left is the kernels' own workspace.
python benchmarks/peak_memory.py [--batch 1 --heads 16 --seqlen 16384 --head-dim 128]"""
import argparse

import torch

import cuflash_attn


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()
    shape = (a.batch, a.heads, a.seqlen, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = cuflash_attn.flash_attention(q, k, v, causal=a.causal, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    mib = 2**20
    tensor_bytes = out.numel() * 2 + lse.numel() * 4 + sum(g.numel() * 2 for g in grads)
    print(f"shape {shape} bf16 causal={a.causal}")
    print(f"inputs q, k, v, dout (held before): {4 * q.numel() * 2 / mib:.1f} MiB")
    print(f"out + lse + dq + dk + dv:            {tensor_bytes / mib:.1f} MiB")
    print(f"peak above the inputs:               {peak / mib:.1f} MiB")
    print(f"workspace beyond those tensors:      {(peak - tensor_bytes) / mib:.1f} MiB")


if __name__ == "__main__":
    main()
