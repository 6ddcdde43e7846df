"""Geometry of SPELL's correction (eq. 5 / eq. 7) and its numerics."""
import math

import pytest
import torch

from guidance import kernels, spell
from guidance import shields as shields_mod
from guidance.shield_views import AffineShields, ConcatShields
from guidance.shields import TensorShields
from guidance.spell import sparse_repellency


def naive_delta(x0, z, r):
    """The paper's Algorithm 2, [B, K, D] at once, float64: the reference."""
    x = x0.flatten(1).double()
    zz = z.flatten(1).double()
    diff = x[:, None, :] - zz[None, :, :]
    dist = diff.norm(dim=-1)
    w = torch.relu(r / dist - 1)
    return (diff * w[..., None]).sum(1).reshape(x0.shape)


def disjoint_shields(k=6, shape=(4, 8, 8), spacing=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *shape, generator=g) * spacing


def test_disjoint_prediction_lands_on_sphere_with_lambda_one():
    z = disjoint_shields()
    r = 5.0
    g = torch.Generator().manual_seed(1)
    x0 = z + torch.randn(z.shape, generator=g) * 0.1
    res = sparse_repellency(x0, r, shields=z)
    dist = (res.denoised - z).flatten(1).norm(dim=1)
    assert torch.allclose(dist, torch.full_like(dist, r), rtol=1e-5)
    assert res.active.all() and (res.shields_hit == 1).all()


def test_overcompensation_pushes_beyond_radius():
    z = disjoint_shields()
    x0 = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(2)) * 0.3
    d0 = (x0 - z).flatten(1).norm(dim=1)
    res = sparse_repellency(x0, 5.0, shields=z, overcompensation=1.6)
    dist = (res.denoised - z).flatten(1).norm(dim=1)
    assert torch.allclose(dist, d0 + 1.6 * (5.0 - d0), rtol=1e-5)
    assert (dist > 5.0).all()


def test_no_correction_when_every_shield_is_farther_than_r():
    z = disjoint_shields()
    x0 = z[:3] + 10.0 * torch.nn.functional.normalize(torch.randn(3, 4 * 8 * 8), dim=1).reshape(3, 4, 8, 8)
    res = sparse_repellency(x0, 5.0, shields=z)
    assert torch.equal(res.denoised, x0)
    assert not res.active.any() and (res.delta == 0).all() and (res.shields_hit == 0).all()


def test_matches_naive_reference_with_overlapping_shields():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3, 5, 5, generator=g)
    x0 = torch.randn(7, 3, 5, 5, generator=g)
    r = 13.0  # typical distances ~12: many active terms per sample
    res = sparse_repellency(x0, r, shields=z, overcompensation=1.3)
    expected = x0.double() + 1.3 * naive_delta(x0, z, r)
    assert torch.allclose(res.denoised.double(), expected, atol=1e-4)
    assert (res.shields_hit > 1).any()


def test_chunked_equals_naive(monkeypatch):
    monkeypatch.setattr(kernels, "DIFF_BLOCK_ELEMENTS", 64)   # one limit for eq. 5's blocks and the distances
    monkeypatch.setattr(shields_mod, "SCREEN_CHUNK_ROWS", 3)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(25, 2, 4, 4, generator=g)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    res = sparse_repellency(x0, 5.5, shields=z)
    assert torch.allclose(res.denoised.double(), x0.double() + naive_delta(x0, z, 5.5), atol=1e-4)


def test_intra_batch_excludes_self_and_is_symmetric_for_two():
    a = torch.zeros(1, 4, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 1.0
    x0 = torch.cat([a, b])
    res = sparse_repellency(x0, 3.0, intra_batch=True)
    move_a, move_b = res.delta[0], res.delta[1]
    assert torch.allclose(move_a, -move_b)
    # Each moves by r - d = 2 along the pair axis; the pair ends at 2r - d = 5 apart.
    assert math.isclose(move_a.norm().item(), 2.0, rel_tol=1e-6)
    assert math.isclose((res.denoised[0] - res.denoised[1]).norm().item(), 5.0, rel_tol=1e-6)
    single = sparse_repellency(a, 3.0, intra_batch=True)
    assert torch.equal(single.denoised, a) and not single.active.any()


def test_intra_batch_matches_naive_reference():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    r = 6.0
    res = sparse_repellency(x0, r, intra_batch=True)
    x = x0.flatten(1).double()
    diff = x[:, None] - x[None]
    dist = diff.norm(dim=-1)
    w = torch.relu(r / dist - 1)
    w.fill_diagonal_(0)
    expected = x + (diff * w[..., None]).sum(1)
    assert torch.allclose(res.denoised.flatten(1).double(), expected, atol=1e-4)


def test_shields_and_intra_batch_together_add_up():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    z = torch.randn(5, 2, 3, 3, generator=g)
    r = 4.0
    both = sparse_repellency(x0, r, shields=z, intra_batch=True).delta
    only_z = sparse_repellency(x0, r, shields=z).delta
    only_b = sparse_repellency(x0, r, intra_batch=True).delta
    assert torch.allclose(both, only_z + only_b, atol=1e-5)


def test_exact_mode_leaves_overlapping_shields_where_eq5_cancels():
    z = torch.zeros(2, 4, 8, 8)
    z[1] += 0.2                                  # centres 3.2 apart, r = 3: heavy overlap
    x0 = z.mean(0, keepdim=True)                 # midpoint: the two terms cancel exactly
    plain = sparse_repellency(x0, 3.0, shields=z)
    assert plain.inside.all()                    # the paper's stated limitation
    exact = sparse_repellency(x0, 3.0, shields=z, exact=True)
    dist = (exact.denoised - z).flatten(1).norm(dim=1)
    assert (dist >= 3.0).all() and not exact.inside.any() and exact.rounds >= 2


def test_exact_mode_with_a_dense_cluster_of_shields():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(30, 2, 4, 4, generator=g) * 0.5      # 30 mutually overlapping balls
    x0 = torch.randn(5, 2, 4, 4, generator=g) * 0.5
    res = sparse_repellency(x0, 3.0, shields=z, exact=True, intra_batch=True)
    d_shields = torch.cdist(res.denoised.flatten(1), z.flatten(1))
    d_batch = torch.cdist(res.denoised.flatten(1), res.denoised.flatten(1)) + torch.eye(5) * 1e9
    assert (d_shields >= 3.0).all() and (d_batch >= 3.0).all()
    assert not res.inside.any()


def test_prediction_on_the_centre_is_pushed_out_deterministically():
    z = disjoint_shields(k=3) * 1000            # large norms: ||a||^2 + ||b||^2 - 2ab cancels to garbage
    x0 = z.clone()
    res = sparse_repellency(x0, 2.0, shields=z)
    dist = (res.denoised - z).flatten(1).norm(dim=1)
    assert torch.isfinite(res.denoised).all() and res.active.all()
    # float32 cannot place a point exactly 2 away from coordinates ~5e4 (ulp 0.004): on the sphere up to that
    assert torch.allclose(dist, torch.full_like(dist, 2.0), rtol=5e-3)
    exact = sparse_repellency(x0, 2.0, shields=z, exact=True)
    assert ((exact.denoised - z).flatten(1).norm(dim=1) >= 2.0).all()
    again = sparse_repellency(x0, 2.0, shields=z)
    assert torch.equal(res.denoised, again.denoised)


def test_identical_batch_samples_are_pushed_apart():
    x0 = torch.ones(3, 4, 4, 4) * 1e4
    res = sparse_repellency(x0, 1.0, intra_batch=True)
    d = torch.cdist(res.denoised.flatten(1).double(), res.denoised.flatten(1).double())
    assert (d + torch.eye(3) * 1e9 > 0.5).all()


def test_a_hair_away_from_a_large_norm_shield():
    z = torch.full((1, 4, 16, 16), 3.0e3)
    x0 = z.clone()
    x0[0, 0, 0, 0] += 0.25                      # distance 0.25, norms ~1e5: expansion gives 0 or < 0
    res = sparse_repellency(x0, 1.0, shields=z)
    dist = (res.denoised.double() - z.double()).flatten(1).norm(dim=1)
    assert torch.allclose(dist, torch.ones_like(dist), rtol=1e-3)
    origin = torch.zeros(1, 4, 16, 16)
    denormal = origin.clone()
    denormal[0, 1, 2, 3] = 1e-40                # its square underflows: a naive norm is 0, r / 0 = inf
    out = sparse_repellency(denormal, 1.0, shields=origin)
    assert torch.isfinite(out.denoised).all()
    assert torch.allclose(out.denoised[0, 1, 2, 3], torch.tensor(1.0), rtol=1e-5)


def test_fp16_and_bf16_inputs_keep_dtype_and_leave_the_shield():
    z = disjoint_shields(k=4).half()
    x0 = (z.float() + torch.randn(z.shape, generator=torch.Generator().manual_seed(8)) * 0.3).half()
    for dtype in (torch.float16, torch.bfloat16):
        res = sparse_repellency(x0.to(dtype), 5.0, shields=z.to(dtype), exact=True)
        assert res.denoised.dtype == dtype and res.denoised.shape == x0.shape
        dist = (res.denoised.float() - z.to(dtype).float()).flatten(1).norm(dim=1)
        assert (dist >= 5.0).all() and not res.inside.any()


def test_video_latents_and_16_channels():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(3, 16, 2, 4, 4, generator=g) * 30
    x0 = z + torch.randn(z.shape, generator=g) * 0.1
    res = sparse_repellency(x0, 4.0, shields=z)
    assert res.denoised.shape == x0.shape
    assert torch.allclose((res.denoised - z).flatten(1).norm(dim=1), torch.full((3,), 4.0), rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x0 = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match="radius"):
        sparse_repellency(x0, 0.0)
    with pytest.raises(ValueError, match="radius"):
        sparse_repellency(x0, float("nan"))
    with pytest.raises(ValueError, match="shape"):
        sparse_repellency(x0, 1.0, shields=torch.zeros(3, 4, 8, 8))
    bad = torch.zeros(3, 4, 4, 4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf at indices \[1\]"):
        sparse_repellency(x0, 1.0, shields=bad)
    with pytest.raises(ValueError, match="overcompensation"):
        sparse_repellency(x0, 1.0, overcompensation=0.0)


def test_tensor_shields_range_search_is_exact_at_the_radius():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(500, 64, generator=g) * 100 + 1000    # large norms, small gaps
    q = z[:4] + torch.nn.functional.normalize(torch.randn(4, 64, generator=g), dim=1) * 3.0
    src = TensorShields(z)
    d = torch.cdist(q.double(), z.double())
    r = float(d.flatten().kthvalue(30).values)             # some shields exactly at the radius
    expected = set((d <= r).any(0).nonzero().flatten().tolist())
    assert set(src.within_indices(q, r).tolist()) == expected
    dist, idx = src.nearest(q)
    assert torch.equal(idx, d.argmin(1)) and torch.allclose(dist.double(), d.min(1).values, rtol=1e-5)


def test_affine_view_matches_transformed_tensor():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(50, 4, 2, 2, generator=g) * 5
    scale, shift = 0.18215, 0.3
    view = AffineShields(TensorShields(z), scale, shift)
    ref = TensorShields((z - shift) * scale)
    q = (z[:3] - shift) * scale + 0.01
    assert torch.allclose(view.within(q, 0.5), ref.within(q, 0.5), atol=1e-5)
    a, b = view.nearest(q), ref.nearest(q)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=1e-5)


def test_concat_sources_offsets_indices():
    a, b = torch.zeros(2, 3), torch.ones(3, 3) * 10
    cat = ConcatShields([TensorShields(a), TensorShields(b)])
    dist, idx = cat.nearest(torch.full((1, 3), 9.0))
    assert idx.item() >= 2 and len(cat) == 5


def test_exact_mode_result_is_outside_by_any_float32_measurement():
    """Points left exactly on a sphere by eq. 5 can measure one ulp inside with another formula."""
    g = torch.Generator().manual_seed(12)
    centres = torch.rand(6, 196, generator=g) * 2 - 1
    z = centres[torch.randint(0, 6, (400,), generator=g)] + 0.12 * torch.randn(400, 196, generator=g)
    x0 = z[:32] + 0.05 * torch.randn(32, 196, generator=g)
    src = TensorShields(z)
    for r in (1.0, 2.0):
        res = sparse_repellency(x0, r, shields=src, exact=True)
        measured, _ = src.nearest(res.denoised)
        exact64 = torch.cdist(res.denoised.double(), z.double()).min(1).values
        assert (measured >= r).all() and (exact64 >= r).all() and not res.inside.any()
        assert res.rounds < spell.MAX_EXACT_ROUNDS
