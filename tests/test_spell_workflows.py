"""SPELL math for inpainting masks, resized and excluded shields (pure torch, no host)."""
import math

import pytest
import torch

from guidance import spell
from guidance.shield_resample import resample_latents
from guidance.shield_views import ExcludedShields
from guidance.shields import TensorShields, resampled_source


def half_movable(shape):
    movable = torch.zeros(shape, dtype=torch.bool)
    movable[..., shape[-1] // 2:] = True
    return movable


def test_masked_push_leaves_the_ball_by_moving_only_the_movable_part():
    gen = torch.Generator().manual_seed(0)
    shield = torch.randn(1, 4, 4, 4, generator=gen)
    x = shield + 0.01 * torch.randn(2, 4, 4, 4, generator=gen)
    movable = half_movable(x.shape)
    r = 3.0
    res = spell.sparse_repellency(x, r, shields=shield, movable=movable)
    assert torch.equal(res.denoised[~movable], x[~movable])
    d = (res.denoised - shield).flatten(1).norm(dim=1)
    assert torch.allclose(d, torch.full_like(d, r), rtol=1e-5)
    assert not res.inside.any()


def test_masked_push_accounts_for_the_fixed_part_distance():
    """Fixed part at distance f < r: the movable part needs only sqrt(r^2 - f^2), not r."""
    shield = torch.zeros(1, 1, 1, 4)
    x = torch.tensor([[[[1.0, 0.0, 0.1, 0.0]]]])   # fixed elements 0..1 at distance 1
    movable = half_movable(x.shape)
    r = 2.0
    res = spell.sparse_repellency(x, r, shields=shield, movable=movable)
    moved = res.denoised[..., 2:].flatten().norm().item()
    assert moved == pytest.approx(math.sqrt(r * r - 1.0), rel=1e-6)
    assert res.denoised[..., :2].tolist() == x[..., :2].tolist()


def test_fixed_part_already_outside_needs_no_push():
    shield = torch.zeros(1, 1, 1, 4)
    x = torch.tensor([[[[3.0, 0.0, 0.0, 0.0]]]])
    res = spell.sparse_repellency(x, 2.0, shields=shield, movable=half_movable(x.shape))
    assert torch.equal(res.denoised, x) and not res.active.any()


def test_nothing_movable_stays_inside_and_says_so():
    shield = torch.zeros(1, 2, 2, 2)
    x = torch.full((1, 2, 2, 2), 0.1)
    res = spell.sparse_repellency(x, 1.0, shields=shield, movable=torch.zeros_like(x, dtype=torch.bool),
                                  exact=True, max_rounds=3)
    assert torch.equal(res.denoised, x) and res.inside.all()


def test_intra_batch_masked_pushes_peers_apart_in_the_mask():
    x = torch.zeros(2, 1, 2, 4)
    movable = half_movable(x.shape)
    res = spell.sparse_repellency(x, 1.0, intra_batch=True, movable=movable, exact=True)
    assert torch.equal(res.denoised[~movable], x[~movable])
    assert (res.denoised[0] - res.denoised[1]).norm().item() >= 1.0


def test_unblended_prediction_moves_the_blend_by_delta_and_keeps_the_rest():
    gen = torch.Generator().manual_seed(1)
    pred, kept = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    mask = torch.zeros(2, 4, 4, 4)
    mask[..., 2:] = 1.0
    mask[..., 2] = 0.25                          # a soft edge
    movable = mask > 1e-3
    blend = spell.inpaint_blend(pred, mask, kept)
    delta = torch.where(movable, torch.randn(2, 4, 4, 4, generator=gen), torch.zeros_like(pred))
    new = spell.unblended_prediction(pred, delta, mask, movable)
    torch.testing.assert_close(spell.inpaint_blend(new, mask, kept), blend + delta)
    assert torch.equal(spell.inpaint_blend(new, mask, kept)[~movable], blend[~movable])


def test_movable_shape_must_match():
    with pytest.raises(ValueError, match="movable must have the prediction's shape"):
        spell.sparse_repellency(torch.zeros(1, 4), 1.0, shields=torch.ones(1, 4),
                                movable=torch.ones(1, 3, dtype=torch.bool))


def test_resample_latents_images_and_video():
    assert resample_latents(torch.randn(3, 4, 4, 4), (8, 8)).shape == (3, 4, 8, 8)
    assert resample_latents(torch.randn(2, 16, 3, 8, 8), (4, 4)).shape == (2, 16, 3, 4, 4)
    const = torch.full((1, 4, 4, 4), 2.5)
    assert torch.allclose(resample_latents(const, (8, 8)), torch.full((1, 4, 8, 8), 2.5))


@pytest.mark.parametrize("have,want,match", [
    ((4, 4, 4), (16, 4, 4), "4 latent channels but the sampled latent has 16"),
    ((16, 5, 4, 4), (16, 3, 4, 4), "5 latent frames but the sampled latent has 3"),
    ((16, 4, 4), (16, 3, 4, 4), "image latents .* video latents"),
])
def test_resampled_source_names_the_dimension_that_differs(have, want, match):
    with pytest.raises(ValueError, match=match):
        resampled_source(TensorShields(torch.zeros(1, *have)), want)


def test_excluded_shields_drop_exactly_the_excluded_ones():
    shields = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 5.0)])
    src = ExcludedShields(TensorShields(shields), shields[:1])
    q = torch.zeros(1, 2, 2)
    assert src.within(q, 3.0).shape[0] == 1                     # the ones-shield only
    dist, idx = src.nearest(q)
    assert dist.item() == pytest.approx(2.0) and idx.item() == -1
    res = spell.sparse_repellency(q, 0.5, shields=src)
    assert not res.active.any()                                  # on the excluded shield: no push
