"""The language-model loss: the output projection and cross-entropy in one pass over row chunks.

The plain way — logits = h @ Wᵀ for every position, then `F.cross_entropy` — writes and reads
the (positions × vocabulary) logits several times: log-softmax, the loss's zero-filled gradient,
log-softmax's backward. On a CPU those passes are memory-bound and cost about a quarter of a
small model's training step (4,096 positions × 4,700 characters is 77 MB a pass). Here each
chunk of rows gets its logits, its log-sum-exp, its loss and — when a backward will follow —
its gradient (softmax − one-hot) while the chunk is still in cache; the gradients of h and W are
kept for backward, which only scales them. The matmul FLOPs are the same as the plain way's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass

CHUNK_ROWS = 1024  # fast on a 2-core CPU and an H200 alike; the (rows × V) fp32 chunk is 19 MB at V = 4,700


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's next-token distribution beside the data (knowledge distillation, Hinton et al. 2015): for
    each position its k most likely tokens `ids` (..., k) and their probabilities `probs` (..., k), whose sum m
    is at most 1, mixed into the target with `weight` w: the target is w · teacher on those k tokens and the
    rest, 1 − w · m, on the data's token (the mass the teacher spreads beyond its k stays with the data)."""

    ids: Tensor
    probs: Tensor
    weight: float


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, y: Tensor, chunk_rows: int, needs_grad: bool,
                soft_ids: Tensor | None = None, soft_probs: Tensor | None = None, soft_weight: float = 0.0) -> Tensor:
        valid = y.ne(-1)
        count = valid.sum()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        # fp32 accumulation, also for bf16 weights: the sum runs over every position.
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if needs_grad else None
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            hc, yc, vc = h[rows], y[rows], valid[rows]
            target = yc.clamp(min=0).unsqueeze(1)  # ignored rows point at token 0 and are masked below
            logits = (hc @ w.T).float()  # (rows, V)
            top = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, target)
            data_share = None
            if soft_ids is not None:  # the target's expected logit: the data token's share + the teacher's
                q = soft_probs[rows] * soft_weight
                data_share = 1.0 - q.sum(dim=1, keepdim=True)
                picked = data_share * picked + (logits.gather(1, soft_ids[rows]) * q).sum(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: this chunk's logits are ours alone
            norm = probs.sum(dim=1, keepdim=True)
            total += ((norm.log() + top - picked).squeeze(1) * vc).sum()
            if needs_grad:
                # d(mean loss)/d(logits) = (softmax − target) / count, zero on ignored rows.
                probs.div_(norm).scatter_add_(1, target, -data_share if data_share is not None
                                              else torch.full_like(picked, -1.0))
                if soft_ids is not None:
                    probs.scatter_add_(1, soft_ids[rows], soft_probs[rows] * -soft_weight)
                probs.mul_((vc / count).unsqueeze(1))
                g = probs.to(h.dtype)
                grad_h[start:start + chunk_rows] = g @ w
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w += (g.T @ hc).float()
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, \
            None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, y: Tensor, chunk_rows: int | None = None,
                         soft: SoftTargets | None = None) -> Tensor:
    """Mean cross-entropy of the logits h @ weightᵀ against targets y, ignoring y == -1, in float32.

    With `soft`, each position's target mixes the teacher's top k into the data's token (see SoftTargets): with
    probabilities summing to 1 the loss is (1 − w) · CE(y) + w · H(teacher, model). Distillation costs k more
    gathered logits per position.

    Equal (to rounding) to `F.cross_entropy((h @ weight.T).float().flatten(0, -2), y.flatten(),
    ignore_index=-1)` with its gradients, without ever holding all the logits; see the module
    docstring. h is (..., d), weight (V, d), y has h's leading shape; rows are taken `chunk_rows`
    (default CHUNK_ROWS) at a time. Under autocast the matmuls run in the autocast dtype, as an
    `nn.Linear` head would.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    h2, w = h.reshape(-1, h.size(-1)).to(dtype), weight.to(dtype)
    needs_grad = torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad)
    if soft is None:
        ids = probs = None
    else:
        k = soft.ids.size(-1)
        ids, probs = soft.ids.reshape(-1, k).to(h.device), soft.probs.reshape(-1, k).to(h.device, torch.float32)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h2, w, y.reshape(-1), chunk_rows or CHUNK_ROWS, needs_grad, ids, probs,
                                         soft.weight if soft is not None else 0.0)
