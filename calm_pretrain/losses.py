"""Losses: the energy score of CALM's head and the autoencoder's clipped KL.

The energy loss per position, with N model samples x_n and M target samples y_m (CALM_SPEC §2):

    L = 2/(N·M) · Σ_{n,m} ‖x_n − y_m‖^α  −  1/(N(N−1)) · Σ_{n≠n'} ‖x_n − x_n'‖^α

Written directly this materialises an N × M × positions × d tensor (3.4 GB in fp32 for one CALM-M
micro-batch). :func:`energy_loss` instead works chunk by chunk over positions: the model–target
distances come from ‖x‖² + ‖y‖² − 2x·y (a batched matmul, after centring each position's points so
the subtraction loses no precision), the model–model distances (N² per position, where samples can
coincide) directly. The gradient with respect to x is formed in the same pass, so nothing of size
M × d outlives its chunk: the targets are frozen and need no gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

TargetFn = Callable[[int, int], torch.Tensor]  # (start, end) → target samples [end-start, M, d]


def clipped_gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, clamp: float) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) per dimension, floored at `clamp`, summed over d, mean over chunks."""
    kl = 0.5 * (mu.float() ** 2 + torch.exp(2 * log_sigma.float()) - 1.0 - 2.0 * log_sigma.float())
    return kl.clamp(min=clamp).sum(-1).mean()


def _distance_weights(dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/d(u) ‖u‖^α = α‖u‖^(α−2) u; the weight α‖u‖^(α−2), zero where u = 0 (a valid subgradient)."""
    positive = dist > 0
    safe = torch.where(positive, dist, torch.ones_like(dist))
    return torch.where(positive, alpha * safe.pow(alpha - 2.0), torch.zeros_like(dist))


def _energy_chunk(x: torch.Tensor, y: torch.Tensor, alpha: float, want_grad: bool):
    """Loss [c] and d loss / d x [c, N, d] for one chunk; x [c, N, d], y [c, M, d], fp32."""
    n, m = x.shape[1], y.shape[1]
    center = x.mean(dim=1, keepdim=True)  # distances are translation invariant
    xc, yc = x - center, y - center

    # model–target term through the Gram form: [c, N, M]
    x2 = (xc * xc).sum(-1)
    y2 = (yc * yc).sum(-1)
    d2_xy = torch.baddbmm(x2[:, :, None] + y2[:, None, :], xc, yc.transpose(1, 2), alpha=-2.0)
    dist_xy = d2_xy.clamp_min_(0.0).sqrt_()

    # model–model term directly: [c, N, N, d] is small (N² ≪ N·M) and exact when samples coincide
    diff_xx = xc[:, :, None, :] - xc[:, None, :, :]
    dist_xx = diff_xx.norm(dim=-1)

    pow_xy = dist_xy.pow(alpha) if alpha != 1.0 else dist_xy
    pow_xx = dist_xx.pow(alpha) if alpha != 1.0 else dist_xx
    loss = (2.0 / (n * m)) * pow_xy.sum((1, 2)) - (1.0 / (n * (n - 1))) * pow_xx.sum((1, 2))
    if not want_grad:
        return loss, None

    w_xy = _distance_weights(dist_xy, alpha)  # [c, N, M]
    grad = (2.0 / (n * m)) * (xc * w_xy.sum(-1, keepdim=True) - torch.bmm(w_xy, yc))
    w_xx = _distance_weights(dist_xx, alpha)  # [c, N, N], zero on the diagonal
    grad -= (2.0 / (n * (n - 1))) * (w_xx[..., None] * diff_xx).sum(2)
    return loss, grad


class _EnergyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, targets: TargetFn, alpha: float, chunk: int):  # noqa: D401
        p = x.shape[0]
        want_grad = ctx.needs_input_grad[0]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16/fp16 → fp32
        xf = x.detach().to(compute)
        losses, grads = [], []
        for start in range(0, p, chunk):
            end = min(start + chunk, p)
            y = targets(start, end).to(compute)
            loss, grad = _energy_chunk(xf[start:end], y, alpha, want_grad)
            losses.append(loss)
            if want_grad:
                grads.append(grad)
        if want_grad:
            ctx.save_for_backward(torch.cat(grads).to(x.dtype))
        return torch.cat(losses).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None, None], None, None, None


def energy_loss(
    samples: torch.Tensor,
    target_mu: Optional[torch.Tensor] = None,
    target_log_sigma: Optional[torch.Tensor] = None,
    *,
    targets: Optional[torch.Tensor] = None,
    num_target_samples: int = 100,
    alpha: float = 1.0,
    chunk_positions: int = 1024,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Energy loss per position (the negative unbiased energy score; lower is better).

    samples: model samples [..., N, d]. Targets are either explicit samples `targets` [..., M, d],
    or drawn here, chunk by chunk, from the posterior N(target_mu, exp(target_log_sigma)²) [..., d].
    Returns [...] (one value per position). Gradients flow to `samples` only.
    """
    lead, (n, d) = samples.shape[:-2], samples.shape[-2:]
    if n < 2:
        raise ValueError(f"energy loss needs at least 2 model samples per position, got {n}")
    x = samples.reshape(-1, n, d)
    p = x.shape[0]
    if targets is not None:
        y_all = targets.reshape(p, -1, d)

        def target_fn(start: int, end: int) -> torch.Tensor:
            return y_all[start:end]
    else:
        if target_mu is None or target_log_sigma is None:
            raise ValueError("energy_loss needs either `targets` or both `target_mu` and `target_log_sigma`")
        mu = target_mu.detach().reshape(p, d).float()
        sigma = target_log_sigma.detach().reshape(p, d).float().exp()

        def target_fn(start: int, end: int) -> torch.Tensor:
            eps = torch.randn((end - start, num_target_samples, d), device=mu.device,
                              dtype=mu.dtype, generator=generator)
            return mu[start:end, None, :] + sigma[start:end, None, :] * eps

    return _EnergyLoss.apply(x, target_fn, float(alpha), int(chunk_positions)).reshape(lead)


def energy_loss_direct(samples: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The plain broadcast formula (materialises [..., N, M, d]); the baseline the fused form is benchmarked against."""
    n, m = samples.shape[-2], targets.shape[-2]
    d_xy = (samples[..., :, None, :] - targets[..., None, :, :]).norm(dim=-1).pow(alpha)
    d_xx = (samples[..., :, None, :] - samples[..., None, :, :]).norm(dim=-1).pow(alpha)
    return (2.0 / (n * m)) * d_xy.sum((-1, -2)) - (1.0 / (n * (n - 1))) * d_xx.sum((-1, -2))
