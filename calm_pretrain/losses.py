"""Losses: the energy score of CALM's head and the autoencoder's clipped KL.

The energy loss per position, with N model samples x_n and M target samples y_m (docs/method.md, 'Energy score'):

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

# (start, end, center [c, 1, d]) → target samples of positions start:end minus center, [c, M, d],
# written into a scratch buffer that the next call overwrites.
TargetFn = Callable[[int, int, torch.Tensor], torch.Tensor]


def clipped_gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, clamp: float) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) per dimension, floored at `clamp`, summed over d, mean over chunks."""
    kl = 0.5 * (mu.float() ** 2 + torch.exp(2 * log_sigma.float()) - 1.0 - 2.0 * log_sigma.float())
    return kl.clamp(min=clamp).sum(-1).mean()


def _distance_weights(dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/d(u) ‖u‖^α = α‖u‖^(α−2) u; the weight α‖u‖^(α−2), zero where u = 0 (a valid subgradient).

    Computed in place on one new tensor: 0^(α−2) = inf is masked to 0 afterwards."""
    w = dist.reciprocal() if alpha == 1.0 else dist.pow(alpha - 2.0).mul_(alpha)
    return w.masked_fill_(dist == 0, 0.0)


def _energy_chunk(x: torch.Tensor, targets: TargetFn, start: int, alpha: float, want_grad: bool):
    """Loss [c] and d loss / d x [c, N, d] for one chunk of positions; x [c, N, d] in the compute dtype.

    Everything of size c·M·d lives in one scratch buffer, `yc`, filled by `targets`; everything else
    is of size c·N·M or smaller.
    """
    n = x.shape[1]
    center = x.mean(dim=1, keepdim=True)  # distances are translation invariant; centring keeps the
    xc = x - center                      # Gram form below free of cancellation against a large mean
    yc = targets(start, start + x.shape[0], center)  # [c, M, d], already centred
    m = yc.shape[1]

    # model–target term through the Gram form ‖x‖² + ‖y‖² − 2x·y: [c, N, M]
    x2 = xc.square().sum(-1)
    y2 = torch.linalg.vector_norm(yc, dim=-1).square_()  # one pass over yc, no c·M·d temporary
    d2_xy = torch.baddbmm(x2[:, :, None] + y2[:, None, :], xc, yc.transpose(1, 2), alpha=-2.0)
    dist_xy = d2_xy.clamp_min_(0.0).sqrt_()

    # model–model term from explicit differences (cdist's direct mode, without materialising the
    # [c, N, N, d] differences): exact, so coinciding samples give a distance of exactly 0
    dist_xx = torch.cdist(xc, xc, compute_mode="donot_use_mm_for_euclid_dist")

    pow_xy = dist_xy.pow(alpha) if alpha != 1.0 else dist_xy
    pow_xx = dist_xx.pow(alpha) if alpha != 1.0 else dist_xx
    loss = (2.0 / (n * m)) * pow_xy.sum((1, 2)) - (1.0 / (n * (n - 1))) * pow_xx.sum((1, 2))
    if not want_grad:
        return loss, None

    # Σ_m w_nm (x_n − y_m) = x_n Σ_m w_nm − Σ_m w_nm y_m, and the same for the model–model pairs
    # (each unordered pair appears twice in the sum over n ≠ n', hence 2/(N(N−1)))
    w_xy = _distance_weights(dist_xy, alpha)  # [c, N, M]
    grad = torch.baddbmm(xc * w_xy.sum(-1, keepdim=True), w_xy, yc, alpha=-1.0).mul_(2.0 / (n * m))
    w_xx = _distance_weights(dist_xx, alpha)  # [c, N, N], zero on the diagonal and on coincidences
    grad_xx = torch.baddbmm(xc * w_xx.sum(-1, keepdim=True), w_xx, xc, alpha=-1.0)
    grad.sub_(grad_xx, alpha=2.0 / (n * (n - 1)))
    return loss, grad


class _EnergyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, targets: TargetFn, alpha: float, chunk: int, want_grad: bool):  # noqa: D401
        p = x.shape[0]
        # needs_input_grad is True for a leaf with requires_grad even under torch.no_grad(), so the
        # caller also says whether a graph is being recorded (eval passes then skip the gradient)
        want_grad = want_grad and ctx.needs_input_grad[0]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16/fp16 → fp32
        xf = x.detach().to(compute)
        loss = xf.new_empty(p)
        grad = torch.empty_like(xf) if want_grad else None  # filled chunk by chunk (no final cat)
        # an enclosing autocast would run the Gram matmuls in bf16/fp16, where ‖x‖² + ‖y‖² − 2x·y
        # loses most of its digits (measured: ~2% error in the loss); this is fp32 arithmetic
        with torch.autocast(device_type=x.device.type, enabled=False):
            for start in range(0, p, chunk):
                end = min(start + chunk, p)
                loss[start:end], g = _energy_chunk(xf[start:end], targets, start, alpha, want_grad)
                if want_grad:
                    grad[start:end] = g
        if want_grad:
            ctx.save_for_backward(grad.to(x.dtype))
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None, None], None, None, None, None


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
    compute = torch.float64 if samples.dtype == torch.float64 else torch.float32
    chunk = max(1, min(int(chunk_positions), p))
    if targets is not None:
        y_all = targets.detach().reshape(p, -1, d)
        # one scratch buffer for every chunk's centred targets: fresh pages cost as much to fault in
        # as the arithmetic done on them, so they are allocated once, not once per chunk
        buf = torch.empty((chunk, y_all.shape[1], d), dtype=compute, device=samples.device)

        def target_fn(start: int, end: int, center: torch.Tensor) -> torch.Tensor:
            return torch.sub(y_all[start:end], center, out=buf[: end - start])  # caller's targets intact
    else:
        if target_mu is None or target_log_sigma is None:
            raise ValueError("energy_loss needs either `targets` or both `target_mu` and `target_log_sigma`")
        mu = target_mu.detach().reshape(p, d).to(compute)
        sigma = target_log_sigma.detach().reshape(p, d).to(compute).exp()
        buf = torch.empty((chunk, num_target_samples, d), dtype=compute, device=samples.device)

        def target_fn(start: int, end: int, center: torch.Tensor) -> torch.Tensor:
            # y − center = (mu − center) + sigma·ε, built in place in the noise buffer; the small
            # offset mu − center is formed before the noise is added
            eps = torch.randn((end - start, num_target_samples, d), generator=generator, out=buf[: end - start])
            return eps.mul_(sigma[start:end, None, :]).add_(mu[start:end, None, :] - center)

    want_grad = torch.is_grad_enabled() and x.requires_grad
    return _EnergyLoss.apply(x, target_fn, float(alpha), chunk, want_grad).reshape(lead)


def energy_loss_direct(samples: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The plain broadcast formula (materialises [..., N, M, d]); the baseline the fused form is benchmarked against."""
    n, m = samples.shape[-2], targets.shape[-2]
    d_xy = (samples[..., :, None, :] - targets[..., None, :, :]).norm(dim=-1).pow(alpha)
    d_xx = (samples[..., :, None, :] - samples[..., None, :, :]).norm(dim=-1).pow(alpha)
    return (2.0 / (n * m)) * d_xy.sum((-1, -2)) - (1.0 / (n * (n - 1))) * d_xx.sum((-1, -2))
