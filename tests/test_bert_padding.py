"""cuflash_attn.bert_padding (flash_attn.bert_padding's functions): unpadding and padding a batch,
their gradients, attention through them, and bad input."""
import numpy as np
import pytest
import torch

from conftest import DEVICES
from cuflash_attn import bert_padding as bp
from cuflash_attn import flash_attn_interface as fa
from reference import attention_reference


def _mask(lengths, seqlen, device, dtype=torch.bool):
    return (torch.arange(seqlen, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64], ids=["bool", "int64"])
def test_unpad_then_pad_keeps_the_tokens(device, mask_dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 2, 5, device=device, dtype=torch.float64)
    mask = _mask([4, 7, 0], 7, device, mask_dtype)
    tokens, indices, cu_seqlens, max_seqlen, used = bp.unpad_input(x, mask)
    assert tokens.shape == (11, 2, 5)
    assert torch.equal(tokens, x[mask.bool()])
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 4, 11, 11]
    assert max_seqlen == 7 and isinstance(max_seqlen, int)
    assert used.dtype == torch.int32 and used.tolist() == [4, 7, 0]
    assert torch.equal(indices, torch.nonzero(mask.bool().flatten()).flatten())
    padded = bp.pad_input(tokens, indices, 3, 7)
    assert torch.equal(padded, x * mask.bool()[:, :, None, None])


@pytest.mark.parametrize("device", DEVICES)
def test_unused_tokens_are_kept_but_not_used(device):
    x = torch.randn(2, 6, 3, device=device)
    mask = _mask([2, 4], 6, device)
    unused = torch.zeros(2, 6, dtype=torch.bool, device=device)
    unused[0, 2:5] = True
    tokens, indices, cu_seqlens, max_seqlen, used = bp.unpad_input(x, mask, unused)
    assert cu_seqlens.tolist() == [0, 5, 9] and max_seqlen == 5 and used.tolist() == [2, 4]
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert torch.equal(tokens, x.reshape(12, 3)[indices])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_through_unpad_and_pad(device):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, device=device, dtype=torch.float64, requires_grad=True)
    mask = _mask([3, 5], 5, device)
    tokens, indices, *_ = bp.unpad_input(x, mask)
    weight = torch.randn_like(tokens)
    padded = bp.pad_input(tokens * weight, indices, 2, 5)
    upstream = torch.randn_like(padded)
    padded.backward(upstream)
    assert torch.equal(x.grad, upstream * weight.new_zeros(2, 5, 3).index_put_((mask,), weight))
    # index_first_axis repeated: the gradient adds up in the source row
    src = torch.randn(4, 2, device=device, dtype=torch.float64, requires_grad=True)
    bp.index_first_axis(src, torch.tensor([1, 1, 3], device=device)).sum().backward()
    assert src.grad.tolist() == [[0, 0], [2, 2], [0, 0], [1, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_attention_on_unpadded_tokens_matches_each_sequence(device):
    """The usual flow: unpad q/k/v with a padding mask, varlen attention, pad the output back."""
    torch.manual_seed(2)
    batch, seqlen, heads, d = 3, 40, 2, 16
    lengths = [40, 17, 1]
    mask = _mask(lengths, seqlen, device)
    q, k, v = (torch.randn(batch, seqlen, heads, d, device=device, dtype=torch.float64) for _ in range(3))
    (q_u, indices, cu, max_s, _), (k_u, *_), (v_u, *_) = (bp.unpad_input(t, mask) for t in (q, k, v))
    out = bp.pad_input(fa.flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_s, max_s, causal=True),
                       indices, batch, seqlen)
    for b, n in enumerate(lengths):
        ref, _ = attention_reference(*(t[b:b + 1, :n].transpose(1, 2) for t in (q, k, v)), causal=True)
        assert torch.allclose(out[b, :n], ref.transpose(1, 2)[0], atol=1e-12)
        assert not out[b, n:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_pad_takes_int32_indices_and_integer_sizes(device):
    """transformers' decoding step pads one query a sequence with cu_seqlens_q[:-1] (int32) as the
    indices; sizes may come as NumPy ints or 0-d tensors."""
    out = torch.randn(2, 4, 8, device=device)
    cu_seqlens_q = torch.arange(3, dtype=torch.int32, device=device)
    padded = bp.pad_input(out, cu_seqlens_q[:-1], np.int64(2), torch.tensor(1))
    assert padded.shape == (2, 1, 4, 8) and torch.equal(padded[:, 0], out)
    assert torch.equal(bp.index_first_axis(out, cu_seqlens_q[1:2]), out[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_concatenated_sequences(device):
    x = torch.arange(12, device=device, dtype=torch.float32).reshape(2, 6, 1)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 0, 2, 0, 0, 0]], device=device)
    tokens, indices, cu_seqlens, max_seqlen = bp.unpad_input_for_concatenated_sequences(x, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert tokens.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10] and max_seqlen == 3


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    x = torch.randn(2, 5, 3, device=device)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        bp.unpad_input(x, torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="attention_mask must be a 2-dimensional"):
        bp.unpad_input(x, torch.ones(10, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="unused_mask has shape"):
        bp.unpad_input(x, torch.ones(2, 5, dtype=torch.bool, device=device), torch.ones(1, 5, device=device))
    with pytest.raises(ValueError, match="hidden_states"):
        bp.unpad_input(torch.randn(10, device=device), torch.ones(2, 5, dtype=torch.bool, device=device))
    tokens = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        bp.pad_input(tokens, torch.tensor([0, 1, 2, 10], device=device), 2, 5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        bp.pad_input(tokens, torch.tensor([0, -1, 2, 3], device=device), 2, 5)
    with pytest.raises(ValueError, match="indices must be a 1-dimensional int32 or int64"):
        bp.pad_input(tokens, torch.tensor([0.0, 1, 2, 3], device=device), 2, 5)
    with pytest.raises(ValueError, match="values has 4 rows but indices 3"):
        bp.pad_input(tokens, torch.tensor([0, 1, 2], device=device), 2, 5)
    with pytest.raises(ValueError, match="seqlen must be a non-negative int"):
        bp.pad_input(tokens, torch.tensor([0, 1, 2, 3], device=device), 2, -5)
    with pytest.raises(ValueError, match="batch must be a non-negative int"):
        bp.pad_input(tokens, torch.tensor([0, 1, 2, 3], device=device), 2.0, 5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        bp.index_first_axis(tokens, torch.tensor([4], device=device))
    with pytest.raises(ValueError, match="add up to more than seqlen"):
        bp.unpad_input_for_concatenated_sequences(x, torch.tensor([[3, 3, 0, 0, 0], [1, 0, 0, 0, 0]], device=device))
    with pytest.raises(ValueError, match="no negative length"):
        bp.unpad_input_for_concatenated_sequences(x, torch.tensor([[3, -1, 0, 0, 0], [1, 0, 0, 0, 0]], device=device))
