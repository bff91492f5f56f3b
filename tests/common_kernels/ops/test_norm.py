import pytest
import torch

from common_kernels.ops.norm.naive import group_rms_norm_gate, rms_norm
from common_kernels.testing import assert_rel_rms, kernel_tolerance


def test_rms_norm_matches_formula_in_float64():
    x, w = torch.randn(5, 3, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    ref = (
        torch.stack(
            [torch.stack([x[i, j] / torch.sqrt((x[i, j] ** 2).sum() / 24 + 1e-6) for j in range(3)]) for i in range(5)]
        )
        * w
    )
    assert_rel_rms("rms_norm", ref, rms_norm(x, w, 1e-6), 1e-14)


def test_rms_norm_statistics_in_fp32_then_cast_then_weight():
    x = (torch.randn(4, 64) * 30).bfloat16()
    w = torch.randn(64).bfloat16()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    # an fp32 residual normalised into the model dtype
    out16 = rms_norm(xf, w, 1e-6, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, expected)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_norm_gate_normalises_each_group(groups):
    T, C = 7, 32
    o, g, w = (
        torch.randn(T, C, dtype=torch.float64),
        torch.randn(T, C, dtype=torch.float64),
        torch.randn(C, dtype=torch.float64),
    )
    out = group_rms_norm_gate(o, g, w, groups, 1e-6)
    size = C // groups
    ref = (
        torch.cat(
            [
                o[:, i * size : (i + 1) * size]
                / torch.sqrt(o[:, i * size : (i + 1) * size].pow(2).mean(-1, keepdim=True) + 1e-6)
                for i in range(groups)
            ],
            dim=1,
        )
        * w
        / (1 + torch.exp(-g))
    )
    assert_rel_rms("group norm gate", ref, out, 1e-14)


def test_group_norm_is_not_a_plain_rms_norm_over_all_channels():
    o = torch.randn(3, 16, dtype=torch.float64)
    o[:, :8] *= 10  # groups with very different scales
    ones = torch.ones(16, dtype=torch.float64)
    zeros = torch.full((3, 16), 50.0, dtype=torch.float64)  # gate ~ 1
    assert not torch.allclose(
        group_rms_norm_gate(o, zeros, ones, 2, 1e-6), group_rms_norm_gate(o, zeros, ones, 1, 1e-6)
    )


def test_group_norm_gate_runs_in_fp32_for_bf16_gate_and_rejects_bad_groups():
    out = group_rms_norm_gate(torch.randn(3, 16), torch.randn(3, 16).bfloat16(), torch.ones(16).bfloat16(), 4, 1e-6)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        group_rms_norm_gate(torch.randn(3, 16), torch.randn(3, 16), torch.ones(16), 3, 1e-6)


def test_group_norm_gate_gradients():
    o, g = (torch.randn(4, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, g, w: group_rms_norm_gate(o, g, w, 3, 1e-6), (o, g, w))


@pytest.mark.parametrize("T,C,groups", [(37, 64, 2), (1, 48, 4), (20, 96, 3), (0, 32, 2)])
def test_fused_group_norm_gate_matches_float64_forward_and_backward(T, C, groups):
    from common_kernels.ops.norm.fused import group_rms_norm_gate_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, g = (torch.randn(T, C, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(C, device=device, requires_grad=True)
    dy = torch.randn(T, C, device=device)
    y = group_rms_norm_gate_triton(x, g, w, groups, 1e-6)
    leaves = [t.detach().double().requires_grad_() for t in (x, g, w)]
    ref = group_rms_norm_gate(*leaves, groups, 1e-6)
    assert y.dtype == torch.float32
    assert_rel_rms("y", ref, y, 1e-6)
    if T:
        for name, a, b in zip(
            ("dx", "dg", "dw"),
            torch.autograd.grad(ref, leaves, dy.double()),
            torch.autograd.grad(y, (x, g, w), dy),
            strict=False,
        ):
            assert_rel_rms(name, a, b, 1e-6)


def test_fused_group_norm_gate_rejects_bad_shapes():
    from common_kernels.ops.norm.fused import group_rms_norm_gate_triton

    with pytest.raises(ValueError, match="do not split into 3 groups"):
        group_rms_norm_gate_triton(torch.randn(2, 16), torch.randn(2, 16), torch.ones(16), 3, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        group_rms_norm_gate_triton(torch.randn(2, 16), torch.randn(2, 16), torch.ones(8), 2, 1e-6)


@pytest.mark.parametrize("T", [1, 3, 37])
def test_fused_group_norm_gate_rows_are_batch_invariant(T):
    """Each row is bit for bit what it gets alone (rows of a tile and ragged last tiles alike), so a token's
    output does not depend on how many tokens share the step."""
    from common_kernels.ops.norm.fused import group_rms_norm_gate_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, g = torch.randn(T, 64, device=device), torch.randn(T, 64, device=device).bfloat16()
    w = torch.randn(64, device=device)
    with torch.no_grad():
        batch = group_rms_norm_gate_triton(x, g, w, 2, 1e-6, torch.bfloat16)
        for t in {0, T // 2, T - 1}:
            assert torch.equal(
                group_rms_norm_gate_triton(x[t : t + 1], g[t : t + 1], w, 2, 1e-6, torch.bfloat16)[0], batch[t]
            )


# ----- aligned mode's RMSNorm kernel (`ops.norm.rms`): the reference's contract, a row's bits independent of the batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,D", [(0, 64), (1, 64), (3, 24), (17, 96)])
@pytest.mark.parametrize(
    "x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, None)]
)
def test_aligned_rms_norm_matches_the_reference(rows, D, x_dtype, out_dtype):
    """Ragged row counts (none, one, fewer and more than a tile), widths that are not a power of two, the fp32
    residual normalised into bf16; against float64, within the two roundings of the output dtype the contract
    makes (the normalised value, then the product), each a kernel's bf16 rounding (`kernel_tolerance`)."""
    from common_kernels.ops.norm import rms_norm_aligned

    g = torch.Generator().manual_seed(rows + D)
    x = (torch.randn(rows, D, generator=g) * 3).to(x_dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(x_dtype)
    got = rms_norm_aligned(x.to(DEVICE), w.to(DEVICE), 1e-6, out_dtype).cpu()
    want_dtype = out_dtype or x_dtype
    assert got.dtype == want_dtype and got.shape == (rows, D)
    if rows:
        reference = rms_norm(x.double(), w.double(), 1e-6)
        bound = 2e-7 if want_dtype == torch.float32 else 2 * kernel_tolerance(torch.bfloat16)
        assert_rel_rms("aligned rms_norm", reference, got, bound)


def test_aligned_rms_norm_of_a_row_does_not_depend_on_the_batch():
    from common_kernels.ops.norm import rms_norm_aligned

    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(37, 96, generator=g).to(DEVICE), torch.randn(96, generator=g).to(DEVICE)
    alone = rms_norm_aligned(x[20:21], w, 1e-6, torch.bfloat16)
    for rows in [slice(20, 21), slice(19, 22), slice(0, 37), slice(20, 37), slice(15, 21)]:
        assert torch.equal(rms_norm_aligned(x[rows], w, 1e-6, torch.bfloat16)[20 - rows.start], alone[0]), rows


def test_aligned_rms_norm_takes_the_reference_gradient_and_keeps_leading_dims():
    from common_kernels.ops.norm import rms_norm_aligned

    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 2, 24, generator=g).transpose(0, 1).requires_grad_()  # not contiguous
    w = torch.randn(24, generator=g, requires_grad=True)
    dy = torch.randn(2, 5, 24, generator=g)
    (rms_norm_aligned(x, w, 1e-6) * dy).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (rms_norm(x2, w2, 1e-6) * dy.double()).sum().backward()
    assert_rel_rms("dx", x2.grad, x.grad, 1e-6)
    assert_rel_rms("dw", w2.grad, w.grad, 1e-6)


def test_aligned_rms_norm_refuses_a_weight_of_another_width():
    from common_kernels.ops.norm.rms import rms_norm_aligned_forward

    with pytest.raises(ValueError, match=r"x \(3, 24\).*weight \(16,\)"):
        rms_norm_aligned_forward(torch.randn(3, 24), torch.randn(16), 1e-6, torch.float32)
