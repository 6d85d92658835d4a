"""Word-region alignment (WRA) by optimal transport, computed with IPOT, as in UNITER.

Reference: ChenRocks/UNITER ``model/ot.py`` (``cost_matrix_cosine``, ``ipot``,
``optimal_transport_dist``) and the ITM/WRA loss of ``model/pretrain.py``; IPOT is Xie et al.
2019, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance".

Layout: every matrix here is ``[B, N, M]`` with rows = text positions and columns = image
positions (UNITER keeps the plan as ``[B, M_img, N_txt]``; the arithmetic is the same, only
transposed).  As in UNITER, the last half-step of each IPOT iteration rescales the text side, so
every real text row of the plan sums to exactly ``1 / N_real`` and every real image column to
approximately ``1 / M_real`` (within about 1e-3 after 50 iterations); the total mass is 1 and the
padding carries no mass.

Departures: padded entries of the scaling vectors are set to exactly 0 (UNITER adds 1e4 to the
denominator instead; the plan is the same because ``A`` is 0 there), lengths are clamped to at
least 1 so an all-padding example gives a zero plan instead of NaN, and IPOT runs in at least
float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pads(n: int, m: int, b: int, text_pad: torch.Tensor, image_pad: torch.Tensor) -> None:
    if text_pad.dtype != torch.bool or image_pad.dtype != torch.bool:
        raise ValueError("text_pad and image_pad must be bool tensors (True = padding)")
    if tuple(text_pad.shape) != (b, n) or tuple(image_pad.shape) != (b, m):
        raise ValueError(f"pad masks must be [B, N] = {(b, n)} and [B, M] = {(b, m)}, got "
                         f"{tuple(text_pad.shape)} and {tuple(image_pad.shape)}")


def _joint_pad(text_pad: torch.Tensor, image_pad: torch.Tensor) -> torch.Tensor:
    """``[B, N, M]`` True where the text row or the image column is padding."""
    return text_pad.unsqueeze(2) | image_pad.unsqueeze(1)


def cost_matrix(text: torch.Tensor, image: torch.Tensor, text_pad: torch.Tensor,
                image_pad: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``[B, N, M]`` cosine distance ``1 - cos(t_i, v_j)``, 0 where either side is padding."""
    if text.dim() != 3 or image.dim() != 3 or text.shape[0] != image.shape[0] \
            or text.shape[2] != image.shape[2]:
        raise ValueError(f"text and image must be [B, N, D] and [B, M, D], got "
                         f"{tuple(text.shape)} and {tuple(image.shape)}")
    b, n, _ = text.shape
    _check_pads(n, image.shape[1], b, text_pad, image_pad)
    t = F.normalize(text, p=2, dim=-1, eps=eps)
    v = F.normalize(image, p=2, dim=-1, eps=eps)
    cost = 1 - t.matmul(v.transpose(1, 2))
    return cost.masked_fill(_joint_pad(text_pad, image_pad), 0)


@torch.no_grad()
def ipot(C: torch.Tensor, text_pad: torch.Tensor, image_pad: torch.Tensor, beta: float = 0.5,
         iterations: int = 50, k: int = 1) -> torch.Tensor:
    """IPOT transport plan ``[B, N, M]`` for cost ``C`` between uniform measures on the real
    text and image positions; computed without gradient.

    Each outer iteration: ``Q = A * T``; ``k`` times: ``delta = 1 / (M_real * Q^T sigma)``,
    ``sigma = 1 / (N_real * Q delta)``; then ``T = diag(sigma) Q diag(delta)``, with
    ``A = exp(-C / beta)`` and ``sigma`` (text side) starting at ``1 / N_real``.
    """
    if C.dim() != 3:
        raise ValueError(f"C must be [B, N, M], got shape {tuple(C.shape)}")
    if beta <= 0 or iterations < 1 or k < 1:
        raise ValueError(f"need beta > 0, iterations >= 1, k >= 1; got {beta}, {iterations}, {k}")
    b, n, m = C.shape
    _check_pads(n, m, b, text_pad, image_pad)
    dtype = torch.promote_types(C.dtype, torch.float32)
    cost = C.detach().to(dtype)
    joint = _joint_pad(text_pad, image_pad)
    text_real, image_real = ~text_pad, ~image_pad
    n_real = text_real.sum(1, keepdim=True).clamp(min=1).to(dtype)  # [B, 1]
    m_real = image_real.sum(1, keepdim=True).clamp(min=1).to(dtype)

    a = torch.exp(-cost / beta).masked_fill(joint, 0)
    plan = torch.ones_like(cost).masked_fill(joint, 0)
    sigma = text_real.to(dtype) / n_real  # [B, N]
    delta = image_real.to(dtype)  # [B, M]
    for _ in range(iterations):
        q = a * plan
        for _ in range(k):
            delta = _safe_inv(m_real * torch.einsum("bnm,bn->bm", q, sigma), image_real)
            sigma = _safe_inv(n_real * torch.einsum("bnm,bm->bn", q, delta), text_real)
        plan = sigma.unsqueeze(2) * q * delta.unsqueeze(1)
    return plan.masked_fill(joint, 0).to(C.dtype)


def _safe_inv(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``1 / x`` at real positions, exactly 0 at padding (no inf/NaN from the zero padding)."""
    return torch.where(real, 1 / torch.where(real, x, torch.ones_like(x)), torch.zeros_like(x))


def ot_distance(C: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``[B]`` transport cost ``sum_ij C_ij T_ij``; the gradient flows through ``C`` only."""
    if C.shape != T.shape:
        raise ValueError(f"C and T must have the same shape, got {tuple(C.shape)} and "
                         f"{tuple(T.shape)}")
    return (C * T.detach()).sum(dim=(1, 2))


def wra_loss(text_h: torch.Tensor, image_h: torch.Tensor, text_pad: torch.Tensor,
             image_pad: torch.Tensor, is_positive: torch.Tensor, *, beta: float = 0.5,
             iterations: int = 50, k: int = 1) -> torch.Tensor:
    """UNITER WRA loss ``(sum_pos d - sum_neg d) / B`` over matched and mismatched pairs.

    ``text_h`` ``[B, N, D]`` and ``image_h`` ``[B, M, D]`` are contextual outputs;
    ``is_positive`` ``[B]`` bool marks the matched pairs.  The 0.1 weight of UNITER's ITM loss is
    applied by the caller.
    """
    if is_positive.dtype != torch.bool or tuple(is_positive.shape) != (text_h.shape[0],):
        raise ValueError(f"is_positive must be a [B] bool tensor, got dtype {is_positive.dtype} "
                         f"and shape {tuple(is_positive.shape)}")
    cost = cost_matrix(text_h, image_h, text_pad, image_pad)
    plan = ipot(cost, text_pad, image_pad, beta=beta, iterations=iterations, k=k)
    dist = ot_distance(cost, plan)
    signed = torch.where(is_positive, dist, -dist)
    return signed.sum() / dist.shape[0]
