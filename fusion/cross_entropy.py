"""The vocabulary projection and its cross-entropy as one autograd function.

``linear_cross_entropy(h, weight, bias, target)`` is ``F.cross_entropy(F.linear(h, weight,
bias), target)`` (mean over the targets that are not ``ignore_index``, or weighted by
``weights``), with one [N, vocab] buffer where autograd's composition makes four (logits,
log-softmax, the loss's gradient, the log-softmax's gradient): the forward turns the logits
into the softmax in place, the backward turns that into the logits' gradient (softmax minus
one-hot, times each target's share of the loss) in place. Fewer passes over [N, vocab],
fewer fresh pages; the same numbers to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, share):
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        picked = logits.gather(1, target[:, None])  # the targets' logits, before the softmax
        top = logits.amax(-1, keepdim=True)
        probs = logits.sub_(top).exp_()  # the buffer becomes exp(logits - max)...
        total = probs.sum(-1, keepdim=True)
        probs.div_(total)  # ...then the softmax
        nll = (top + total.log() - picked)[:, 0]  # logsumexp - the target's logit
        ctx.save_for_backward(h, weight, probs, target, share)
        ctx.has_bias, ctx.used = bias is not None, False
        return (nll * share).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.used:  # the softmax buffer became the gradient the first time
            raise RuntimeError("linear_cross_entropy's backward runs once (no retain_graph)")
        ctx.used = True
        h, weight, g, target, share = ctx.saved_tensors
        rows = torch.arange(g.shape[0], device=g.device)
        g.index_put_((rows, target), torch.tensor(-1.0, dtype=g.dtype, device=g.device),
                     accumulate=True)  # softmax - one-hot
        g.mul_((share * grad)[:, None])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        return (g @ weight if need_h else None, g.t() @ h if need_w else None,
                g.sum(0) if need_b and ctx.has_bias else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, weights: torch.Tensor | None = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of ``F.linear(h, weight, bias)`` ([N, dim] -> [N, vocab]) against
    ``target`` [N]: the mean over targets other than ``ignore_index``, or with ``weights``
    [N] the weighted mean. Under autocast it is the composed ``F.cross_entropy`` (the
    logits cast to float32)."""
    if h.ndim != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes h [N, dim] and target [N], got "
                         f"{tuple(h.shape)} and {tuple(target.shape)}")
    keep = target != ignore_index
    share = keep.to(h.dtype) if weights is None else weights.to(h.dtype) * keep
    if torch.is_autocast_enabled(h.device.type):
        logits = F.linear(h, weight, bias).float()
        nll = F.cross_entropy(logits, target.masked_fill(~keep, 0), reduction="none")
        return (nll * share.float()).sum() / share.float().sum()
    return _LinearCrossEntropy.apply(h, weight, bias, target.masked_fill(~keep, 0).long(),
                                     share / share.sum())
