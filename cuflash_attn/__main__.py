"""python -m cuflash_attn: the environment, a check of the op against a float64 reference on
the available device, and a small timing table against torch's SDPA backends."""
import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash_attn

PEERS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def environment(device):
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, cuflash_attn {cuflash_attn.__version__}"]
    if device == "cuda":
        lines.append(f"GPU {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append(f"CPU only ({torch.get_num_threads()} threads): {platform.processor() or platform.machine()}")
    return "\n".join(lines)


def check(device):
    """Forward and backward of every dtype against float64, causal and not."""
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for causal in (False, True):
            q, k, v = (torch.randn(2, 4, n, 64, device=device, dtype=dtype, requires_grad=True) for n in (300, 257, 257))
            out = cuflash_attn.flash_attention(q, k, v, causal=causal)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
            ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
            errs = [(a.double() - b).abs().max().item() / b.abs().max().item()
                    for a, b in zip((out, *grads), (ref, *ref_grads))]
            rows.append((str(dtype).replace("torch.", ""), causal, *errs))
    print(f"{'dtype':<9} {'causal':<6} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}   (max error / max |reference|)")
    worst = 0.0
    for dtype, causal, *errs in rows:
        print(f"{dtype:<9} {str(causal):<6} " + " ".join(f"{e:9.2e}" for e in errs))
        worst = max(worst, max(errs) if dtype in ("float32", "float64") else 0.0)
    ok = all(max(errs) < (2e-2 if dtype in ("float16", "bfloat16") else 1e-4) for dtype, _, *errs in rows)
    print("check:", "PASS" if ok else "FAIL")
    return ok


def timed(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def benchmark(device):
    """Forward and forward+backward time (median ms) and forward TFLOP/s, ours against the
    SDPA backends on the same inputs."""
    if device == "cuda":
        dtype, shapes, reps = torch.bfloat16, [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (8, 32, 2048, 64, False)], 20
    else:
        dtype, shapes, reps = torch.float32, [(1, 4, 512, 64, False), (1, 4, 512, 64, True)], 3
    print(f"\n{'shape (B, H, N, D)':<22} {'causal':<6} {'impl':<15} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd TFLOP/s':>12}")
    impls = {"cuflash_attn": lambda q, k, v, c: cuflash_attn.flash_attention(q, k, v, causal=c)}
    for name, backend in PEERS.items():
        impls[name] = lambda q, k, v, c, backend=backend: _sdpa(backend, q, k, v, c)
    for b, h, n, d, causal in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    fwd = timed(lambda: fn(q, k, v, causal), device, reps)
                both = timed(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout), device, reps)
                print(f"{str((b, h, n, d)):<22} {str(causal):<6} {name:<15} {fwd:8.3f} {both:11.3f} {flops / fwd / 1e9:12.1f}")
            except RuntimeError as e:
                print(f"{str((b, h, n, d)):<22} {str(causal):<6} {name:<15} unavailable: {str(e).splitlines()[0][:60]}")


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main():
    parser = argparse.ArgumentParser(prog="python -m cuflash_attn", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bench", action="store_true", help="only check, do not time")
    args = parser.parse_args()
    print(environment(args.device))
    ok = check(args.device)
    if not args.no_bench:
        benchmark(args.device)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
