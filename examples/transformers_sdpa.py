"""HuggingFace transformers on cuflash_attn: one switch, the same training.

Builds a tiny Llama from a config (random weights, nothing downloaded; 4 query heads sharing 2
key/value heads, head_dim 64, attn_implementation="sdpa"), trains it a few SGD steps on the same
random tokens twice, with the same seed: once with torch's scaled_dot_product_attention, once
inside `with cuflash_attn.enable():`, and compares the loss and every gradient at every step.
Without a padding mask the model calls SDPA with is_causal=True and no attn_mask, which the
kernels run; the script checks that every call took the kernel path.

    python examples/transformers_sdpa.py                         # CPU, float32
    python examples/transformers_sdpa.py --device cuda --dtype bf16

--dtype fp32: both runs in float32 with torch's reference pinned to its math backend (exact
float32 on CPU and CUDA, as cuflash_attn's float32 kernels are). TESTING.md allows 1e-5 relative
error per attention output; through two layers, forward and backward, and the steps, the check
allows 1e-4 relative to the largest value of each tensor.
--dtype bf16: a float32 model under torch.autocast(bfloat16). The accuracy rule of TESTING.md:
against a float32 run, cuflash_attn's error may be at most 3x the error of torch's own bf16 run,
plus one bf16 rounding of the reference.

Exits 1 on a mismatch or if a call fell back to torch. Works with transformers 4.46 and later.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import cuflash_attn
except ModuleNotFoundError as e:  # not installed: the repository's in-place build
    if e.name != "cuflash_attn":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import cuflash_attn

FP32_RTOL = 1e-4
BF16_FACTOR = 3.0


def build_model(device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.train()


def train(device, steps, seed, autocast_dtype, math_backend):
    """Returns [(loss, {name: grad}) per step], from the same initial weights and data every time."""
    torch.manual_seed(seed)
    model = build_model(device)
    tokens = torch.randint(0, model.config.vocab_size, (steps, 4, 128), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for ids in tokens:
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None), \
                sdpa_kernel(SDPBackend.MATH) if math_backend else _nothing():
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        history.append((loss.detach().double(),
                        {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compare(ours, ref, pt=None):
    """For the loss and the gradients: the (error, bound) pair closest to its bound over every
    step and tensor, and whether every error is within its bound."""
    worst = {}
    for step, (o, r) in enumerate(zip(ours, ref)):
        pairs = [("loss", o[0], r[0], pt[step][0] if pt else None)]
        pairs += [("grad", o[1][n], r[1][n], pt[step][1][n] if pt else None) for n in r[1]]
        for kind, got, want, baseline in pairs:
            err = (got - want).abs().max().item()
            if baseline is None:  # fp32: relative to the tensor's largest value
                bound = FP32_RTOL * want.abs().max().item()
            else:  # bf16: the accuracy rule against torch's own bf16 run
                floor = 2 * (want.bfloat16().double() - want).abs().max().item()
                bound = BF16_FACTOR * (baseline - want).abs().max().item() + floor
            ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
            if kind not in worst or ratio > worst[kind][2]:
                worst[kind] = (err, bound, ratio)
    return all(ratio <= 1.0 for _, _, ratio in worst.values()), worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    bf16 = torch.bfloat16 if args.dtype == "bf16" else None
    runs = {}
    with cuflash_attn.disable():
        runs["torch fp32 math"] = train(args.device, args.steps, args.seed, None, math_backend=True)
        if bf16:
            runs["torch bf16"] = train(args.device, args.steps, args.seed, bf16, math_backend=False)
    cuflash_attn.reset_sdpa_stats()
    with cuflash_attn.enable():
        runs["cuflash_attn"] = train(args.device, args.steps, args.seed, bf16, math_backend=False)
    stats = cuflash_attn.sdpa_stats()

    ok, worst = compare(runs["cuflash_attn"], runs["torch fp32 math"], runs.get("torch bf16"))
    print(f"device {args.device}, {args.dtype}, {args.steps} steps, transformers "
          f"{__import__('transformers').__version__}, torch {torch.__version__}")
    for name, history in runs.items():
        print(f"  {name:16s} losses " + " ".join(f"{loss.item():.6f}" for loss, _ in history))
    for kind, (err, bound, _) in worst.items():
        print(f"  |cuflash_attn - torch fp32| of the {kind}, nearest its bound: {err:.3e} (bound {bound:.3e})")
    print(f"  SDPA calls: {stats['cuflash_attn']} by cuflash_attn, fallback {stats['fallback'] or 'none'}")
    print(f"  {time.perf_counter() - start:.1f} s")
    if stats["cuflash_attn"] == 0 or stats["fallback"]:
        print("FAIL: the model's attention did not run on cuflash_attn's kernels", file=sys.stderr)
        return 1
    if not ok:
        print("FAIL: cuflash_attn's training run differs from torch's beyond the bound", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
