"""Operator checks: opcheck, gradcheck, torch.compile, CUDA graphs, streams, determinism."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import cuflash_attn
from conftest import DEVICES, ENTRIES, assert_cuda_graph_replays_bitwise, entry_call, requires_cuda
from cuflash_attn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

ops = torch.ops.cuflash_attn


def qkv(device, dtype, b=2, h=3, nq=37, nk=45, d=24, requires_grad=True):
    return [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=requires_grad) for n in (nq, nk, nk)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_opcheck_fwd(device, dtype, causal, bottom_right):
    q, k, v = qkv(device, dtype)
    torch.library.opcheck(ops.fwd.default, (q, k, v),
                          {"scale": 0.3, "is_causal": causal, "bottom_right": bottom_right})


def feature_options(device, heads=3):
    """Every option of the ops at once (GQA comes from the inputs)."""
    return dict(is_causal=True, bottom_right=True, window_left=20, softcap=8.0,
                alibi_slopes=torch.rand(heads, device=device), dropout_p=0.2,
                rng_state=torch.tensor([11, 0], dtype=torch.int64, device=device))


def gqa_qkv(device, dtype, requires_grad=True, nq=37, nk=45, d=24):
    q = torch.randn(2, 4, nq, d, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(2, 2, nk, d, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def varlen_qkv(device, dtype, requires_grad=True, d=16):
    cu_q = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 20, 22], dtype=torch.int32, device=device)
    q = torch.randn(30, 4, d, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(22, 2, d, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return (q, k, v), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=25, max_seqlen_k=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_opcheck_with_features(device, dtype, varlen):
    if varlen:
        (q, k, v), extra = varlen_qkv(device, dtype)
        options = dict(feature_options(device, heads=4), **extra)
    else:
        q, k, v = gqa_qkv(device, dtype)
        options = feature_options(device, heads=4)
    torch.library.opcheck(ops.fwd.default, (q, k, v), options)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = ops.fwd(q, k, v, **options)
    torch.library.opcheck(ops.bwd.default, (torch.randn_like(out), q, k, v, out, lse, None), options)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dropout_mask(device):
    state = torch.tensor([3, 4], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.dropout_mask.default, (state, 0.3, 2, 3, 17, 29))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_gradcheck_fp64_with_features(device, varlen):
    if varlen:
        (q, k, v), extra = varlen_qkv(device, torch.float64, d=8)
        options = dict(feature_options(device, heads=4), **extra)
    else:
        q, k, v = gqa_qkv(device, torch.float64, nq=9, nk=13, d=8)
        options = dict(feature_options(device, heads=4), window_left=5)
    # Packed, some rows see no key: their lse is -inf, which has no finite difference.
    fn = lambda q, k, v: ops.fwd(q, k, v, **options)[0 if varlen else slice(None)]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_bwd(device, with_dlse):
    q, k, v = qkv(device, torch.float32, requires_grad=False)
    out, lse = ops.fwd(q, k, v, None, True, False)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(ops.bwd.default, (dout, q, k, v, out, lse, dlse), {"scale": None, "is_causal": True})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fp64(device, causal):
    q, k, v = qkv(device, torch.float64, b=1, h=2, nq=9, nk=13, d=8)
    fn = lambda q, k, v: cuflash_attn.flash_attention(q, k, v, causal=causal, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def _flash_attn_func_bhsd(q, k, v, **options):
    """flash_attn_func on [batch, heads, seqlen, head_dim] tensors, viewed (not copied) as its
    [batch, seqlen, heads, head_dim] layout: (out, softmax_lse), out back in [B, H, N, D]."""
    out, lse, _ = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), return_attn_probs=True, **options)
    return out.transpose(1, 2), lse


# Options of the flash_attn functions at once (bottom-right causal, a window, softcap; the
# gradchecks add ALiBi): no query row is left without a key with nq <= nk, so lse stays finite.
# deterministic=True (flash_attn's default is False) so that CUDA graph replays compare bitwise.
FA_OPTIONS = dict(causal=True, window_size=(5, 0), softcap=8.0, deterministic=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
def test_gradcheck_fp64_flash_attn_func(device, features):
    """float64 gradcheck of flash_attn_func (out and softmax_lse) in its own layout, GQA: catches
    a wrong transpose or head grouping in the Python wrapper's backward, and wrong gradients of
    the options it passes on."""
    q, k, v = gqa_qkv(device, torch.float64, nq=9, nk=13, d=8)
    options = dict(FA_OPTIONS, alibi_slopes=torch.rand(4, device=device)) if features else {}
    assert torch.autograd.gradcheck(lambda q, k, v: _flash_attn_func_bhsd(q, k, v, **options), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
def test_gradcheck_fp64_flash_attn_varlen_func(device, features):
    """float64 gradcheck of flash_attn_varlen_func (out and softmax_lse [heads, total_q]) on a
    packed batch with a sequence without queries, GQA; every query row sees a key (lse finite)."""
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 20, 29], dtype=torch.int32, device=device)
    q = torch.randn(12, 4, 8, device=device, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(29, 2, 8, device=device, dtype=torch.float64, requires_grad=True) for _ in range(2))
    options = dict(FA_OPTIONS, alibi_slopes=torch.rand(4, device=device)) if features else {}

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 11, return_attn_probs=True, **options)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


# (query shape, key/value shape, attn_mask: None, "bool" or the shape of a float mask that
# requires grad, is_causal, enable_gqa) for torch.nn.functional.scaled_dot_product_attention
# routed to cuflash_attn; float masks broadcast over batch and/or heads, so their gradient is a sum.
SDPA_GRADCHECK_CASES = {
    "plain": ((2, 3, 6, 8), (2, 3, 7, 8), None, False, False),
    "causal": ((2, 3, 6, 8), (2, 3, 7, 8), None, True, False),
    "gqa": ((2, 4, 6, 8), (2, 2, 7, 8), None, True, True),
    "bool mask": ((2, 3, 6, 8), (2, 3, 7, 8), "bool", False, False),
    "float mask [L, S]": ((2, 3, 6, 8), (2, 3, 7, 8), (6, 7), False, False),
    "float mask [B, 1, 1, S]": ((2, 3, 6, 8), (2, 3, 7, 8), (2, 1, 1, 7), False, False),
    "float mask [B, H, L, S]": ((2, 3, 6, 8), (2, 3, 7, 8), (2, 3, 6, 7), False, False),
    "float mask gqa [1, H, L, S]": ((2, 4, 6, 8), (2, 2, 7, 8), (1, 4, 6, 7), False, True),
    "3-d inputs, float mask [L, S]": ((3, 6, 8), (3, 7, 8), (6, 7), False, False),
    "5-d inputs, float mask [2, 1, L, S]": ((2, 2, 3, 6, 8), (2, 2, 3, 7, 8), (2, 1, 6, 7), False, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SDPA_GRADCHECK_CASES))
def test_gradcheck_fp64_sdpa_dropin(device, case):
    """float64 gradcheck of torch.nn.functional.scaled_dot_product_attention after
    cuflash_attn.enable(), with respect to query, key, value and a float attn_mask that requires
    grad (its gradient summed over the dimensions it broadcasts over); every call must run the
    kernels (no fallback to torch's SDPA, which would make the check vacuous)."""
    shape_q, shape_kv, mask_kind, is_causal, enable_gqa = SDPA_GRADCHECK_CASES[case]
    make = lambda shape: torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = make(shape_q), make(shape_kv), make(shape_kv)
    inputs = [q, k, v]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape_q[-2], shape_kv[-2], device=device) > 0.3
        mask[:, 0] = True  # every row sees a key
    elif mask_kind is not None:
        inputs.append(make(mask_kind))

    def fn(q, k, v, mask=mask):
        with cuflash_attn.enable():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)

    before = cuflash_attn.sdpa_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash_attn.FallbackWarning)
        assert torch.autograd.gradcheck(fn, inputs)
    after = cuflash_attn.sdpa_stats()
    assert after["fallback"] == before["fallback"], "some calls ran torch's SDPA"
    assert after["cuflash_attn"] > before["cuflash_attn"]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64_bottom_right_with_empty_rows(device):
    """nq > nk with bottom-right alignment: the first rows see no key."""
    q, k, v = qkv(device, torch.float64, b=1, h=1, nq=11, nk=6, d=8)
    fn = lambda q, k, v: ops.fwd(q, k, v, None, True, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    q, k, v = qkv(device, torch.float64, b=1, h=1, nq=4, nk=5, d=8)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.gradgradcheck(lambda q, k, v: cuflash_attn.flash_attention(q, k, v), (q, k, v))


def _loss_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def _compiled_flash_attention(q, k, v):
    return cuflash_attn.flash_attention(q * 2, k, v, causal=True) + 1


def _compiled_flash_attn_func(q, k, v):
    # flash_attn's [B, N, H, D] layout as transposed views, GQA, bottom-right causal with a window
    # and softcap, and lse in the loss (its gradient too).
    out, lse = _flash_attn_func_bhsd(q * 2, k, v, **FA_OPTIONS)
    return out + lse[..., None] + 1


def _compiled_flash_attn_varlen_func(q, k, v):
    # [B, H, N, D] packed to [B * N, H, D]: each batch row a sequence of the packed call.
    b, h, nq, d = q.shape
    cu_q, cu_k = (torch.arange(b + 1, dtype=torch.int32, device=q.device) * n for n in (nq, k.shape[2]))
    packed = [t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (q * 2, k, v)]
    out = flash_attn_varlen_func(*packed, cu_q, cu_k, nq, k.shape[2], **FA_OPTIONS)
    return out.reshape(b, nq, h, d).transpose(1, 2) + 1


COMPILED = {"flash_attention": _compiled_flash_attention, "flash_attn_func": _compiled_flash_attn_func,
            "flash_attn_varlen_func": _compiled_flash_attn_varlen_func}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(COMPILED))
def test_torch_compile_fullgraph(device, entry):
    """torch.compile(fullgraph=True) traces the entry point with no graph break (it raises
    otherwise) and matches eager, forward and backward."""
    q, k, v = qkv(device, torch.float32) if entry == "flash_attention" else gqa_qkv(device, torch.float32)
    fn = COMPILED[entry]
    eager = _loss_and_grads(fn, q, k, v)
    compiled = _loss_and_grads(torch.compile(fn, fullgraph=True), q, k, v)
    for a, b in zip(eager, compiled):
        # Inductor sums the loss's gradient for lse (over head_dim) in another order than eager:
        # float32 rounding of the largest gradient, not of each small element.
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_kvcache_decoding_step(device):
    """A decoding step (new keys appended at tensor cache_seqlens, rotary embedding, rows picked by
    cache_batch_idx) traces with no graph break: nothing is read back to the host while compiling
    (positions are clamped, as under CUDA graph capture), and it matches eager, caches included
    (the rotated keys to float32 rounding: on CUDA, Inductor fuses the rotation's products into
    FMAs; the rest of each cache bitwise)."""
    from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 4, 32, device=device) for _ in range(3))
    caches = [torch.randn(3, 16, 4, 32, device=device) for _ in range(2)]
    lengths = torch.tensor([3, 7], dtype=torch.int32, device=device)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=device)
    cos, sin = (torch.rand(20, 8, device=device) for _ in range(2))

    def step(k_cache, v_cache):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
                                       cache_batch_idx=rows, causal=True)

    eager_caches, compiled_caches = [t.clone() for t in caches], [t.clone() for t in caches]
    eager = step(*eager_caches)
    compiled = torch.compile(step, fullgraph=True)(*compiled_caches)
    torch.testing.assert_close(compiled, eager)
    written = torch.zeros(3, 16, dtype=torch.bool, device=device)
    written[rows.long(), lengths.long()] = True  # one new key a sequence, at its cache_seqlens
    for a, b, original in zip(compiled_caches, eager_caches, caches):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6)
        assert torch.equal(a[~written], b[~written]) and torch.equal(a[~written], original[~written])


FAKE_SHAPE_CASES = {  # q, k, v shapes (int32: dtype) the op refuses, and its message
    "v seqlen": ([(2, 4, 8, 16)] * 2 + [(2, 4, 5, 16)], None, "k and v must have the same seqlen, got 8 and 5"),
    "v head_dim": ([(2, 4, 8, 16)] * 2 + [(2, 4, 8, 8)], None, r"the same head_dim, got 16, 16 and 8"),
    "heads": ([(2, 3, 8, 16)] + [(2, 2, 8, 16)] * 2, None, r"the heads of q \(3\) must be a multiple"),
    "batch": ([(2, 4, 8, 16)] + [(3, 4, 8, 16)] * 2, None, "the same batch size, got 2, 3 and 3"),
    "int32": ([(2, 4, 8, 16)] * 3, torch.int32, "must be a CUDA or CPU tensor of dtype float16"),
    "head_dim 300": ([(2, 4, 8, 300)] * 3, None, r"head_dim must be in \[1, 256\], got 300"),
}


@pytest.mark.parametrize("case", list(FAKE_SHAPE_CASES))
def test_the_fakes_refuse_what_the_op_refuses(case):
    """The forward's and backward's fakes (meta tensors, torch.export's and torch.compile's
    tracing) raise the op's own error on shapes it refuses, so that an exported program fails at
    export, not when it runs; before, they returned q's shape."""
    shapes, dtype, message = FAKE_SHAPE_CASES[case]
    for device in ("cpu", "meta"):
        q, k, v = (torch.ones(s, device=device, dtype=dtype or torch.float32) for s in shapes)
        with pytest.raises((ValueError, TypeError), match=message):
            torch.ops.cuflash_attn.fwd(q, k, v)
    q, k, v = (torch.ones(s, device="meta", dtype=dtype or torch.float32) for s in shapes)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.cuflash_attn.bwd(torch.empty_like(q), q, k, v, torch.empty_like(q), q.new_empty(q.shape[:3]))

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return cuflash_attn.flash_attention(q, k, v)

    if dtype is None:
        with pytest.raises(Exception, match=message):
            torch.export.export(Attend(), tuple(torch.randn(s) for s in shapes))


def test_dropout_probabilities_keep_dynamic_shapes():
    """flash_attn_func's return_attn_probs with dropout calls dropout_mask, whose sizes are SymInts:
    torch.export with dynamic batch and seqlen, and one compiled graph for three shapes (as int
    arguments they were specialized: an export error, a graph per shape)."""
    from torch.export import Dim

    def probs(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.2, causal=True, return_attn_probs=True)[2]

    class Probs(torch.nn.Module):
        def forward(self, q, k, v):
            return probs(q, k, v)

    make = lambda b, s: [torch.randn(b, s, 4, 16) for _ in range(3)]  # noqa: E731
    dims = {0: Dim("batch", min=2), 1: Dim("seqlen", min=2)}
    exported = torch.export.export(Probs(), tuple(make(2, 9)), dynamic_shapes=(dims, dims, dims))
    assert exported.module()(*make(3, 11)).shape == (3, 4, 11, 11)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(probs, backend=backend, dynamic=True, fullgraph=True)
    for b, s in [(2, 9), (3, 11), (4, 13)]:
        assert compiled(*make(b, s)).shape == (b, 4, s, s)
    assert len(graphs) == 1


@requires_cuda
def test_torch_compile_reduce_overhead():
    q, k, v = qkv("cuda", torch.bfloat16, requires_grad=False)
    fn = torch.compile(lambda q, k, v: cuflash_attn.flash_attention(q, k, v, causal=True),
                       mode="reduce-overhead", fullgraph=True)
    expected = cuflash_attn.flash_attention(q, k, v, causal=True)
    for _ in range(3):
        got = fn(q, k, v)
    torch.testing.assert_close(got, expected)


@requires_cuda
@pytest.mark.parametrize("entry", list(COMPILED))
def test_cuda_graph_capture_and_replay_bitwise(entry):
    """Each entry point (flash_attn_func with GQA, a window, softcap and lse; the varlen one with
    its cu_seqlens made on the GPU) forward and backward in a CUDA graph: no host sync or
    allocation outside torch's allocator during capture (capture raises), and replays equal eager."""
    q, k, v = (qkv("cuda", torch.bfloat16, b=2, h=4, nq=300, nk=300, d=64) if entry == "flash_attention"
               else gqa_qkv("cuda", torch.bfloat16, nq=300, nk=300, d=64))
    fn = COMPILED[entry]
    assert_cuda_graph_replays_bitwise(lambda: _loss_and_grads(fn, q, k, v))


@requires_cuda
def test_non_default_stream():
    q, k, v = qkv("cuda", torch.float16, b=4, h=4, nq=500, nk=700, d=128)
    expected = cuflash_attn.flash_attention(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuflash_attn.flash_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(expected, got)


# The race test's batches: grids of thousands of CTAs.
RACE_BATCH = {"ops.fwd": 200, "flash_attn_func": 96, "flash_attn_varlen_func": 200, "flash_attn_with_kvcache": 64,
              "sdpa": 96}


def _assert_repeats_equal(name, run, repeats):
    first = run()
    for _ in range(repeats):
        for i, (a, b) in enumerate(zip(first, run())):
            assert torch.equal(a, b), f"{name}: result {i} differs between repeats"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ENTRIES)
def test_deterministic_50_repeats(device, name):
    """shared/TESTING.md's determinism: every public entry point's outputs and gradients
    (deterministic=True where the entry takes it) bitwise equal over 50 repeats, on each device."""
    _assert_repeats_equal(name, entry_call(name, device, 3), 50)


@requires_cuda
@pytest.mark.parametrize("name", ENTRIES)
def test_race_large_batch_250_repeats(name):
    """The race test of every public entry point: a large batch (a grid of thousands of CTAs),
    250 repeats bitwise equal to the first, gradients included (the fused backward's ordered dQ
    adds; GQA's summed dK/dV), and the split-KV combine over a paged cache."""
    _assert_repeats_equal(name, entry_call(name, "cuda", RACE_BATCH[name]), 250)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_gradient(device):
    """lse is differentiable: d lse / d scores = P."""
    q, k, v = qkv(device, torch.float64, b=1, h=2, nq=7, nk=10, d=8)
    fn = lambda q, k, v: cuflash_attn.flash_attention(q, k, v, return_lse=True)[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@requires_cuda
def test_debug_switch_names_each_launch(monkeypatch, capfd):
    """CUFLASH_DEBUG=1: a stderr line per kernel launch, naming it (which path ran)."""
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    out.sum().backward()
    torch.cuda.synchronize()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("cuflash_attn: ")]
    assert any("flash_fwd" in line and "<__half, 64" in line for line in lines), lines
    assert any("flash_bwd_dq" in line for line in lines) and any("flash_bwd_dkdv" in line for line in lines), lines
    assert all("grid (" in line and "threads" in line for line in lines), lines
    monkeypatch.setenv("CUFLASH_DEBUG", "0")
    torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    torch.cuda.synchronize()
    assert "cuflash_attn: " not in capfd.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_through_lse_raises(device):
    """A double backward that reaches bwd only through dlse (lse's gradient feeds dq) refuses
    too, rather than answering None."""
    q, k, v = qkv(device, torch.float64, b=1, h=1, nq=4, nk=5, d=8)
    x = torch.randn(1, 1, 4, device=device, dtype=torch.float64, requires_grad=True)
    out, lse = cuflash_attn.flash_attention(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad(out.sum() + (x * lse.square()).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(dq.sum(), x)

