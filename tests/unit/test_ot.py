"""IPOT word-region alignment: marginals, padding, distances, gradients and the WRA loss sign."""

from __future__ import annotations

import pytest
import torch

from omnimask.train.objectives.ot import cost_matrix, ipot, ot_distance, wra_loss

TEXT_LENS = (7, 5, 3)
IMAGE_LENS = (9, 6, 2)
N, M, D = 7, 9, 64  # D=64: cosine costs of random features, where 50 IPOT steps reach 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pads(lens: tuple[int, ...], size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] >= torch.tensor(lens)[:, None]


def _batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    text = torch.randn(len(TEXT_LENS), N, D, generator=g)
    image = torch.randn(len(TEXT_LENS), M, D, generator=g)
    return text, image, _pads(TEXT_LENS, N), _pads(IMAGE_LENS, M)


def _plan(seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    text, image, tp, ip = _batch(seed)
    cost = cost_matrix(text, image, tp, ip)
    return cost, ipot(cost, tp, ip, **kw), tp, ip


def _expected_marginals(tp, ip):
    n_real = (~tp).sum(1, keepdim=True).float()
    m_real = (~ip).sum(1, keepdim=True).float()
    return (~tp).float() / n_real, (~ip).float() / m_real


@pytest.mark.parametrize("seed", range(5))
def test_plan_marginals_are_uniform_over_real_positions(seed):
    _, plan, tp, ip = _plan(seed)
    rows, cols = _expected_marginals(tp, ip)
    # text side is rescaled last (as in UNITER): exact; image side converges
    torch.testing.assert_close(plan.sum(2), rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), cols, atol=1e-3, rtol=0)
    torch.testing.assert_close(plan.sum((1, 2)), torch.ones(3), atol=1e-6, rtol=0)


def test_plan_has_no_mass_on_padding_and_is_nonnegative():
    cost, plan, tp, ip = _plan()
    joint = tp[:, :, None] | ip[:, None, :]
    assert (plan[joint] == 0).all()
    assert (plan >= 0).all()
    assert (cost[joint] == 0).all()


def test_more_iterations_tighten_the_image_marginal():
    g = _gen(3)
    tp, ip = _pads(TEXT_LENS, N), _pads(IMAGE_LENS, M)
    cost = (2 * torch.rand(3, N, M, generator=g, dtype=torch.float64)).masked_fill(
        tp[:, :, None] | ip[:, None, :], 0)
    _, cols = _expected_marginals(tp, ip)
    err = [(ipot(cost, tp, ip, iterations=it).sum(1) - cols).abs().max().item()
           for it in (5, 50, 400)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 1e-4


def test_identical_permuted_sets_have_distance_near_zero():
    g = _gen(1)
    text = torch.randn(2, 10, D, generator=g)
    image = text[:, torch.randperm(10, generator=g)] * 3.0  # cosine ignores the scale
    pad = torch.zeros(2, 10, dtype=torch.bool)
    cost = cost_matrix(text, image, pad, pad)
    dist = ot_distance(cost, ipot(cost, pad, pad))
    assert dist.abs().max().item() < 1e-3


def test_matching_sets_are_closer_than_unrelated_sets():
    text, image, tp, ip = _batch()
    noisy = text + 0.3 * torch.randn(3, N, D, generator=_gen(9))
    near = cost_matrix(text, noisy, tp, tp)
    far = cost_matrix(text, image, tp, ip)
    d_near = ot_distance(near, ipot(near, tp, tp))
    d_far = ot_distance(far, ipot(far, tp, ip))
    assert (d_near < d_far - 0.3).all()


def test_gradient_flows_through_cost_only():
    text, image, tp, ip = _batch()
    text.requires_grad_(True)
    image.requires_grad_(True)
    cost = cost_matrix(text, image, tp, ip)
    plan = ipot(cost, tp, ip)
    assert cost.requires_grad and not plan.requires_grad
    ot_distance(cost, plan).sum().backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
    assert image.grad is not None and image.grad.abs().sum() > 0
    # padded features do not influence the distance
    assert (text.grad[tp] == 0).all() and (image.grad[ip] == 0).all()
    leaf = cost.detach().requires_grad_(True)
    ot_distance(leaf, plan).sum().backward()
    torch.testing.assert_close(leaf.grad, plan)  # d/dC sum C*T = T, T treated as constant


def test_wra_loss_is_signed_mean_of_distances():
    text, image, tp, ip = _batch()
    positive = torch.tensor([True, False, True])
    cost = cost_matrix(text, image, tp, ip)
    d = ot_distance(cost, ipot(cost, tp, ip))
    expected = (d[0] - d[1] + d[2]) / 3
    torch.testing.assert_close(wra_loss(text, image, tp, ip, positive), expected)


def test_wra_loss_pulls_positives_together_and_pushes_negatives_apart():
    text, image, tp, ip = _batch()
    positive = torch.tensor([True, False, False])
    base = wra_loss(text, image, tp, ip, positive).item()
    closer = image.clone()
    closer[0, :N] = text[0] + 0.1 * closer[0, :N]  # positive pair aligned: distance drops
    assert wra_loss(text, closer, tp, ip, positive).item() < base - 0.1
    negative_close = image.clone()
    negative_close[1, :N] = text[1]  # a negative pair made similar: loss rises
    assert wra_loss(text, negative_close, tp, ip, positive).item() > base + 0.1
    # one gradient step on the image features lowers the loss
    feats = image.clone().requires_grad_(True)
    loss = wra_loss(text, feats, tp, ip, positive)
    loss.backward()
    stepped = (feats - 5.0 * feats.grad).detach()
    assert wra_loss(text, stepped, tp, ip, positive).item() < loss.item()


def test_all_padding_example_gives_zero_not_nan():
    text, image, tp, ip = _batch()
    tp[2] = True
    cost = cost_matrix(text, image, tp, ip)
    plan = ipot(cost, tp, ip)
    assert torch.isfinite(plan).all() and plan[2].abs().sum() == 0


def test_shape_errors():
    text, image, tp, ip = _batch()
    with pytest.raises(ValueError):
        cost_matrix(text, image[:, :, :5], tp, ip)
    with pytest.raises(ValueError):
        cost_matrix(text, image, tp[:, :3], ip)
    with pytest.raises(ValueError):
        wra_loss(text, image, tp, ip, torch.tensor([1, 0, 1]))
