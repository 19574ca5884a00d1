"""RoPE kernel against its PyTorch reference and transformers' own functions, forward and backward.

Inputs are laid out as attention modules hand them over: q and k are `.transpose(1, 2)` views of
(batch, seq, heads, head_dim) projections, or slices of one fused qkv projection as in Phi-3. cos and sin
are random rather than real angles, so nothing relies on cos^2 + sin^2 = 1 or on equal halves.
On a CPU this runs under TRITON_INTERPRET=1 (conftest.py sets it); on a GPU, natively.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.rope import apply_rope, rope_reference

# max error relative to the float64 reference's largest magnitude, forward and backward alike. Outputs are
# rounded once, from float32: 2**-9 for bfloat16 on a GPU, 2**-8 under the interpreter, which truncates
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}
# (batch, q_heads, kv_heads, seq, head_dim, rotary_dim)
SHAPES = [
    (2, 4, 2, 7, 16, 16),  # GQA, odd seq
    (1, 8, 8, 5, 64, 64),  # plain multi-head
    (3, 6, 1, 13, 32, 24),  # multi-query, partial rotary (Phi-3.5's factor 0.75)
    (2, 3, 3, 9, 24, 12),  # half widths 6, not a power of two: masked lanes
    (1, 20, 4, 3, 256, 256),  # Gemma's head_dim: the heads take two loop steps
]


def attention_inputs(shape, dtype, layout: str, cos_batch: int, seed: int):
    """Leaf tensors, a function making q and k of them as attention modules do, cos, sin and upstream grads."""
    batch, q_heads, kv_heads, seq, head_dim, rotary_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def random(*size):
        return torch.randn(size, generator=generator).to(DEVICE, dtype)

    def heads_first(x, heads):
        return x.view(batch, seq, heads, head_dim).transpose(1, 2)

    if layout == "fused":
        leaves = (random(batch, seq, (q_heads + 2 * kv_heads) * head_dim),)
        q_width, k_width = q_heads * head_dim, kv_heads * head_dim

        def views(qkv):
            return heads_first(qkv[..., :q_width], q_heads), heads_first(qkv[..., q_width:q_width + k_width], kv_heads)
    else:
        leaves = random(batch, seq, q_heads * head_dim), random(batch, seq, kv_heads * head_dim)

        def views(q, k):
            q, k = heads_first(q, q_heads), heads_first(k, kv_heads)
            return (q.contiguous(), k.contiguous()) if layout == "contiguous" else (q, k)
    cos, sin = random(cos_batch, seq, rotary_dim), random(cos_batch, seq, rotary_dim)
    grads = random(batch, q_heads, seq, head_dim), random(batch, kv_heads, seq, head_dim)
    return leaves, views, cos, sin, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["transposed", "fused", "contiguous"])
def test_rope_matches_reference(shape, dtype, layout):
    cos_batch = 1 if layout == "transposed" else shape[0]  # transformers passes batch 1 without position_ids
    leaves, views, cos, sin, grads = attention_inputs(shape, dtype, layout, cos_batch, seed=sum(shape))
    leaves = tuple(leaf.requires_grad_() for leaf in leaves)
    q, k = views(*leaves)
    assert layout == "contiguous" or not q.is_contiguous()
    q_before, k_before = q.detach().clone(), k.detach().clone()

    q_out, k_out = apply_rope(q, k, cos, sin)
    got_grads = torch.autograd.grad((q_out, k_out), leaves, grads)
    ref_leaves = tuple(leaf.detach().double().requires_grad_() for leaf in leaves)
    want_q, want_k = rope_reference(*views(*ref_leaves), cos.double(), sin.double())
    want_grads = torch.autograd.grad((want_q, want_k), ref_leaves, tuple(g.double() for g in grads))

    assert q_out.dtype == k_out.dtype == dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before)  # inputs are not overwritten
    for got, want in [(q_out, want_q), (k_out, want_k), *zip(got_grads, want_grads)]:
        assert relative_error(got, want) < TOLERANCE[dtype]
    rotary_dim = shape[-1]
    assert torch.equal(q_out[..., rotary_dim:], q_before[..., rotary_dim:])  # the tail passes through exactly


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_rope_matches_transformers(family):
    """Real angles as Llama's rotary module builds them (equal halves), and Phi-3's partial rotary."""
    transformers_rope = {"llama": llama_rope, "phi3": phi3_rope}[family]
    batch, q_heads, kv_heads, seq, head_dim = 2, 4, 2, 11, 32
    rotary_dim = head_dim if family == "llama" else 24
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    positions = torch.tensor([list(range(seq)), list(range(5, 5 + seq))], dtype=torch.float64)
    angles = positions[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(batch, seq, q_heads, head_dim, generator=generator).to(DEVICE).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=generator).to(DEVICE).transpose(1, 2)

    for got, want in zip(apply_rope(q, k, cos, sin), transformers_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # bfloat16 q and k with float32 angles, as under autocast: transformers' result is float32, so is ours
    q16, k16 = q.bfloat16(), k.bfloat16()
    for got, want in zip(apply_rope(q16, k16, cos, sin), transformers_rope(q16, k16, cos, sin)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unsupported_inputs_fail_loudly():
    q, k = torch.randn(2, 4, 5, 16, device=DEVICE), torch.randn(2, 2, 5, 16, device=DEVICE)
    angles = torch.randn(1, 5, 16, device=DEVICE)
    cases = [
        ((q[0], k[0], angles, angles), "must be \\(batch, heads, seq, head_dim\\)"),
        ((q, k[..., :8], angles, angles), "differ in batch, seq or head_dim"),
        ((q, k, angles[:, :4], angles[:, :4]), "do not fit q's batch 2 and seq 5"),
        ((q, k, angles.expand(3, 5, 16), angles.expand(3, 5, 16)), "do not fit q's batch 2"),
        ((q, k, angles[..., :7], angles[..., :7]), "rotary_dim 7 must be even"),
        ((q[..., :8], k[..., :8], angles, angles), "rotary_dim 16 must be even and within head_dim 8"),
        ((q, k, angles, angles[0]), "must share one"),
        ((q, k.double(), angles, angles), "differ in dtype"),
        ((q.int(), k.int(), angles, angles), "unsupported dtype torch.int32"),
        ((q, k, angles.clone().requires_grad_(), angles), "require gradients"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_rope(*args)
