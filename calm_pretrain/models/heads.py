"""Generative heads of CALM: hidden state h → samples of the next chunk's latent.

A head is a module with two entry points:
  * ``sample(h, num_samples, generator=None)`` → samples [..., num_samples, latent_dim]
  * ``loss(h, target_mu, target_log_sigma, generator=None)`` → per-position training loss [...]
    (targets: the frozen AE posterior N(mu, exp(log_sigma)²) of the next chunk, [..., latent_dim])
and an attribute ``evals_per_sample`` (network evaluations per generated vector). BrierLM and
temperature sampling only call ``sample``, so any head works with them. An optional
``reset_output()`` is called by CALM after the generic weight init. New heads register in
:data:`HEADS`; ``model.head.type`` picks one:
  * energy    — one-step noise → latent generator trained by the energy score (the published head)
  * flow      — flow matching, Euler/midpoint ODE sampler (``flow_steps``, ``flow_solver``)
  * diffusion — cosine-schedule ε-prediction diffusion, DDIM sampler (``diffusion_steps``)
  * gmm       — diagonal Gaussian mixture (``num_components``) trained by likelihood
  * mse       — regression onto the posterior mean; deterministic samples
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.losses import energy_loss


def head_init_std(init_std: float, width: int, reference_width: int) -> float:
    """The head's init std at backbone width `width`: init_std below `reference_width` scaled by
    sqrt(reference_width / width), else init_std (reference_width 0: never scaled).

    Why: every linear of fan-in H with N(0, s²) weights scales its input by about s·sqrt(H). The
    condition reaches the energy head's residual stream through a chain of such linears and a gated
    product, so its effect at init shrinks like a high power of s·sqrt(H): measured with s = 0.02,
    a change of the condition moves the residual stream by ~4e-6 (relative) at H = 128 against ~1e-2
    at H = 1024, and a narrow head barely learns to use its condition. Holding s·sqrt(H) at its
    published CALM-M value restores that regime at every width (tests/test_head_init.py)."""
    if reference_width and width < reference_width:
        return init_std * math.sqrt(reference_width / width)
    return init_std


class ResidualMLPBlock(nn.Module):
    """x ← x + down(silu(g) ⊙ u), [g, u] = MLP([LN(x); c]) (the reference MLPBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width)
        )
        self.down_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [P, N, H] (one row per sample), cond [P, 1, H] (shared by a position's samples).

        The first linear acts on the concatenation [LN(x); cond]; its cond half is applied once
        per position rather than once per sample.
        """
        first = self.linears[0]
        pre = F.linear(self.in_ln(x), first.weight[:, : self.width]) + F.linear(
            cond, first.weight[:, self.width :], first.bias
        )
        g, u = self.linears[4](F.silu(self.linears[2](F.silu(pre)))).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(g) * u)


class FinalLayer(nn.Module):
    def __init__(self, width: int, latent_dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(nn.Module):
    """One-step energy-based head ("MLPGenerator"): uniform noise + condition → latent sample."""

    evals_per_sample = 1

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.noise_embd = nn.Linear(head_cfg.noise_size, hidden_size)
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm_noise = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp_blocks = nn.ModuleList(ResidualMLPBlock(hidden_size) for _ in range(head_cfg.num_blocks))
        self.final_layer = FinalLayer(hidden_size, latent_dim)

    def reset_output(self) -> None:
        """Zero-initialise the output projection, as published (called after the generic init)."""
        nn.init.zeros_(self.final_layer.linears[2].weight)
        nn.init.zeros_(self.final_layer.linears[2].bias)

    def draw_noise(self, h: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None):
        """U[-0.5, 0.5]^noise_size for every (position, sample), in one call."""
        shape = (*h.shape[:-1], num_samples, self.cfg.noise_size)
        return torch.rand(shape, device=h.device, dtype=h.dtype, generator=generator) - 0.5

    def residual_stream(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h [..., H], noise [..., N, noise_size] → the residual stream after the last block [P, N, H]."""
        n = noise.shape[-2]
        cond = self.norm_hidden(self.hidden_embd(h)).reshape(-1, 1, h.shape[-1])
        x = self.norm_noise(self.noise_embd(noise.reshape(-1, n, noise.shape[-1])))
        for block in self.mlp_blocks:
            x = block(x, cond)
        return x

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h [..., H], noise [..., N, noise_size] → samples [..., N, latent_dim] in one batched pass."""
        lead, n = h.shape[:-1], noise.shape[-2]
        return self.final_layer(self.residual_stream(h, noise)).reshape(*lead, n, self.latent_dim)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        return self(h, self.draw_noise(h, num_samples, generator))

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        samples = self.sample(h, self.cfg.num_samples, generator)
        return energy_loss(
            samples, target_mu, target_log_sigma,
            num_target_samples=self.cfg.num_target_samples, alpha=self.cfg.alpha,
            chunk_positions=self.cfg.loss_chunk_positions, generator=generator,
        )


# --------------------------------------------------------------------------------------------
# Alternative heads (docs/method.md, 'Alternative generative heads'). They share two pieces:
# posterior samples as training targets, and — for the iterative heads — an AdaLN-conditioned MLP.
# --------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Losses are reduced in fp32 (fp64 stays fp64): bf16 sums of squares lose most of their digits."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def posterior_samples(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
                      generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None):
    """num_samples draws from N(mu, exp(log_sigma)²) per position: [..., d] → [..., N, d].

    The autoencoder is frozen, so the targets carry no gradient (docs/method.md, 'Energy score': the head must learn
    the posterior's spread, not only its mean)."""
    dtype = dtype or mu.dtype
    mu, sigma = mu.detach().to(dtype), log_sigma.detach().to(dtype).exp()
    eps = torch.randn((*mu.shape[:-1], num_samples, mu.shape[-1]), generator=generator, device=mu.device, dtype=dtype)
    return mu[..., None, :] + sigma[..., None, :] * eps


class TimestepEmbedder(nn.Module):
    """Scalar time t ∈ [0, 1] → [..., width]: sinusoidal features of 1000·t, then a 2-layer MLP.

    The factor 1000 puts t on the integer-timestep scale for which DiT/MAR's frequencies (max
    period 10⁴) were chosen; flow time and diffusion step t/T both arrive as fractions."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float())[..., None] * freqs
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """x ← x + gate ⊙ MLP(LN(x)·(1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y)).

    y (time + condition) enters only through the modulation, as in MAR's SimpleMLPAdaLN ResBlock."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada_ln_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class AdaLNFinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class AdaLNMLP(nn.Module):
    """Network of the flow and diffusion heads: (x_t, t, h) → a vector of the latent's size.

    y = TimeEmbed(t) + Linear(h) modulates ``num_blocks`` residual blocks (the energy head's depth).
    Shapes: x [P, N, d]; t broadcastable to [P, N] (one time per row while training, one scalar per
    solver step while sampling); c = :meth:`condition` (h) [P, 1, H], computed once per position and
    reused across a sampler's steps. With a shared t the modulations are per position, not per row.
    """

    def __init__(self, hidden_size: int, latent_dim: int, num_blocks: int):
        super().__init__()
        self.input_proj = nn.Linear(latent_dim, hidden_size)
        self.time_embed = TimestepEmbedder(hidden_size)
        self.cond_embed = nn.Linear(hidden_size, hidden_size)
        self.res_blocks = nn.ModuleList(AdaLNBlock(hidden_size) for _ in range(num_blocks))
        self.final_layer = AdaLNFinalLayer(hidden_size, latent_dim)

    def reset_output(self) -> None:
        """DiT/MAR init: zero modulations and output, so every block starts as the identity and the
        network outputs 0; the output layer still receives a gradient on the first step."""
        for block in self.res_blocks:
            nn.init.zeros_(block.ada_ln_modulation[1].weight)
            nn.init.zeros_(block.ada_ln_modulation[1].bias)
        for lin in (self.final_layer.ada_ln_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        return self.cond_embed(h)

    def start_sampling(self, h: torch.Tensor, num_samples: int, generator: Optional[torch.Generator]):
        """A sampler's start: (c [P, 1, H] for the positions of h [..., H] flattened, standard normal
        noise x [P, num_samples, d]). The noise is the first draw of the sampler."""
        c = self.condition(h.reshape(-1, 1, h.shape[-1]))
        x = torch.randn((c.shape[0], num_samples, self.input_proj.in_features), generator=generator,
                        device=h.device, dtype=h.dtype)
        return c, x

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = c + self.time_embed(t)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class FlowHead(nn.Module):
    """Flow matching (rectified-flow path): x_t = (1−t)·x0 + t·x1, x0 ~ N(0, I), x1 a posterior
    sample, t ~ U(0, 1); the network regresses the path's velocity x1 − x0 (docs/method.md,
    'Alternative generative heads').

    Sampling integrates dx/dt = v(x, t, h) from t = 0 (noise) to 1 with ``flow_steps`` equal steps of
    the Euler or the midpoint solver (1 or 2 network evaluations per step). The reference uses the
    midpoint solver with 20 evaluations, i.e. the defaults flow_steps = 10, flow_solver = midpoint.
    """

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.net = AdaLNMLP(hidden_size, latent_dim, head_cfg.num_blocks)
        self.evals_per_sample = self.evals_for(head_cfg)

    @staticmethod
    def evals_for(head_cfg) -> int:
        return head_cfg.flow_steps * (2 if head_cfg.flow_solver == "midpoint" else 1)

    def reset_output(self) -> None:
        self.net.reset_output()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [P, N, d], t broadcastable to [P, N], c = net.condition(h) [P, 1, H] → v [P, N, d]."""
        return self.net(x, t, c)

    def loss_from(self, h: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow-matching loss for given draws: h [..., H], x1 and x0 [..., N, d], t [..., N] →
        mean over the N rows and d dimensions of ‖v(x_t, t, h) − (x1 − x0)‖², per position [...]."""
        lead, (n, d) = h.shape[:-1], x1.shape[-2:]
        x1, x0, t = x1.reshape(-1, n, d), x0.reshape(-1, n, d), t.reshape(-1, n)
        xt = (1 - t[..., None]) * x0 + t[..., None] * x1
        v = self.velocity(xt, t, self.net.condition(h.reshape(-1, 1, h.shape[-1])))
        dt = _compute_dtype(v)
        return (v.to(dt) - (x1 - x0).to(dt)).square().mean((-1, -2)).reshape(lead)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        """Draw order (documented, tests replay it): posterior samples, then x0, then t."""
        n = self.cfg.num_samples
        x1 = posterior_samples(target_mu, target_log_sigma, n, generator, dtype=h.dtype)
        x0 = torch.randn(x1.shape, generator=generator, device=h.device, dtype=h.dtype)
        t = torch.rand(x1.shape[:-1], generator=generator, device=h.device, dtype=h.dtype)
        return self.loss_from(h, x1, x0, t)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        lead = h.shape[:-1]
        c, x = self.net.start_sampling(h, num_samples, generator)
        steps = self.cfg.flow_steps
        dt = 1.0 / steps
        for i in range(steps):
            # the time in fp32 (fp64 stays fp64) even for a bf16 model, where 0.7 would be 0.69921875
            t = torch.tensor(i * dt, device=h.device, dtype=_compute_dtype(h))
            v = self.velocity(x, t, c)
            if self.cfg.flow_solver == "midpoint":
                v = self.velocity(x + 0.5 * dt * v, t + 0.5 * dt, c)
            x = x + dt * v
        return x.reshape(*lead, num_samples, self.latent_dim)


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t, t = 0..T−1, of the cosine schedule (Nichol & Dhariwal 2021), float64 on the CPU.

    ᾱ(u) = cos²((u + s)/(1 + s)·π/2); β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta);
    ᾱ_t = Π_{j≤t}(1 − β_j).
    Explicitly on the CPU so that a model built on the meta device (parameter counting) still has it.
    """
    u = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


class DiffusionHead(nn.Module):
    """Gaussian diffusion with ε-prediction (docs/method.md, 'Alternative generative heads'): cosine schedule over T =
    ``diffusion_train_steps`` discrete steps; x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, t uniform in {0..T−1},
    loss ‖ε̂(x_t, t, h) − ε‖² averaged over rows and dimensions.

    Sampling: deterministic DDIM (η = 0) over ``diffusion_steps`` timesteps t_i = ⌊i·T/S⌋, i = S−1..0
    (the DDIM paper's uniform skip: 990, 980, …, 0 for S = 100), from x ~ N(0, I); one network
    evaluation per step. DDIM rather than the reference's DDPM-ancestral sampler with a learned
    variance: with ε-prediction it needs no variance output and stays accurate at few steps. The skip
    never starts at t = T−1, where ᾱ ≈ 2e-9 and x̂0 = (x − √(1−ᾱ)ε̂)/√ᾱ would amplify the network's
    error ~10⁴-fold.
    """

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.net = AdaLNMLP(hidden_size, latent_dim, head_cfg.num_blocks)
        self.evals_per_sample = self.evals_for(head_cfg)
        # a plain attribute, not a buffer: model.to(bf16) would round 1 − ᾱ_t near t = 0 to zero
        self.alphas_cumprod = cosine_alphas_cumprod(head_cfg.diffusion_train_steps)
        self._schedule_cache: dict = {}

    @staticmethod
    def evals_for(head_cfg) -> int:
        return head_cfg.diffusion_steps

    def reset_output(self) -> None:
        self.net.reset_output()

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._schedule_cache:
            self._schedule_cache[device] = self.alphas_cumprod.to(device)
        return self._schedule_cache[device]

    def sampling_timesteps(self) -> list:
        """t_i = ⌊i·T/S⌋ for i = 0..S−1 (ascending; the sampler walks it backwards)."""
        big_t, s = self.cfg.diffusion_train_steps, self.cfg.diffusion_steps
        return [i * big_t // s for i in range(s)]

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [P, N, d], integer steps t broadcastable to [P, N], c = net.condition(h) → ε̂ [P, N, d]."""
        return self.net(x, t.to(torch.float32) / self.cfg.diffusion_train_steps, c)

    def loss_from(self, h: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε-prediction loss for given draws: h [..., H], x0 and eps [..., N, d], integer t
        [..., N] → mean over rows and dimensions of ‖ε̂(x_t, t, h) − ε‖², per position [...]."""
        lead, (n, d) = h.shape[:-1], x0.shape[-2:]
        x0, eps, t = x0.reshape(-1, n, d), eps.reshape(-1, n, d), t.reshape(-1, n)
        abar = self._alphas_cumprod_on(x0.device)[t][..., None]  # float64: 1 − ᾱ_t keeps its digits
        xt = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).to(x0.dtype)
        pred = self.predict_noise(xt, t, self.net.condition(h.reshape(-1, 1, h.shape[-1])))
        dt = _compute_dtype(pred)
        return (pred.to(dt) - eps.to(dt)).square().mean((-1, -2)).reshape(lead)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        """Draw order (documented, tests replay it): posterior samples, then ε, then t."""
        n = self.cfg.num_samples
        x0 = posterior_samples(target_mu, target_log_sigma, n, generator, dtype=h.dtype)
        eps = torch.randn(x0.shape, generator=generator, device=h.device, dtype=h.dtype)
        t = torch.randint(0, self.cfg.diffusion_train_steps, x0.shape[:-1], generator=generator, device=h.device)
        return self.loss_from(h, x0, eps, t)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        lead = h.shape[:-1]
        c, x = self.net.start_sampling(h, num_samples, generator)
        abar = self.alphas_cumprod.tolist()  # python floats (double precision) for the coefficients
        steps = self.sampling_timesteps()
        for i in reversed(range(len(steps))):
            t = steps[i]
            a_t, a_prev = abar[t], (abar[steps[i - 1]] if i > 0 else 1.0)  # ᾱ_{−1} = 1: the last step lands on x̂0
            eps = self.predict_noise(x, torch.tensor(t, device=h.device), c)
            x0_hat = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * eps
        return x.reshape(*lead, num_samples, self.latent_dim)


class ConditionMLP(nn.Module):
    """h → features [..., H] for the one-shot heads: Linear + LN (as the energy head embeds h), then
    ``num_blocks`` pre-LN residual MLP blocks x ← x + W₂·SiLU(W₁·LN(x)), then the energy head's
    final-layer shape (LN, Linear, SiLU, Linear) onto the output size."""

    def __init__(self, hidden_size: int, out_dim: int, num_blocks: int):
        super().__init__()
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=1e-6)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-6), nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                          nn.Linear(hidden_size, hidden_size))
            for _ in range(num_blocks)
        )
        self.final_layer = FinalLayer(hidden_size, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm_hidden(self.hidden_embd(h))
        for block in self.blocks:
            x = x + block(x)
        return self.final_layer(x)


class GMMHead(nn.Module):
    """A mixture of C = ``num_components`` diagonal Gaussians per position, read off h in one pass:
    mixing logits [..., C], means [..., C, d], log standard deviations [..., C, d].

    Trained by the negative log-likelihood (nats per latent vector) of ``num_samples`` posterior
    samples per position, averaged over the samples. Sampling: a component by Gumbel-max on the
    logits, then mean + σ·ε. One network evaluation per position, whatever the number of samples.
    """

    evals_per_sample = 1
    # σ ∈ [e⁻⁷, e⁵]: the posterior's σ ≈ 0.3 sits far inside; the floor keeps a component that
    # collapses onto one sample from driving the likelihood to infinity
    LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 5.0

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.num_components = head_cfg.num_components
        self.net = ConditionMLP(hidden_size, self.num_components * (2 * latent_dim + 1), head_cfg.num_blocks)

    def mixture(self, h: torch.Tensor):
        """h [..., H] → (logits [..., C], means [..., C, d], log_sigma [..., C, d])."""
        c, d = self.num_components, self.latent_dim
        out = self.net(h)
        logits = out[..., :c]
        params = out[..., c:].reshape(*h.shape[:-1], c, 2, d)
        log_sigma = params[..., 1, :].clamp(self.LOG_SIGMA_MIN, self.LOG_SIGMA_MAX)
        return logits, params[..., 0, :], log_sigma

    def nll(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """−log p(y | h) for y [..., N, d] → [..., N].

        Σ_d (y − m)²/σ² is expanded into matmuls (Σ y²/σ² − 2 Σ y·m/σ² + Σ m²/σ²) so that nothing of
        size N·C·d is materialised; the samples and the means are first shifted by the samples' mean
        (the likelihood is translation invariant) so that the expansion cancels no large terms.
        """
        logits, means, log_sigma = self.mixture(h)
        dt = _compute_dtype(means)
        logits, means, log_sigma, y = logits.to(dt), means.to(dt), log_sigma.to(dt), y.to(dt)
        center = y.detach().mean(-2, keepdim=True)  # [..., 1, d]
        yc, mc = y - center, means - center
        inv_var = torch.exp(-2 * log_sigma)  # [..., C, d]
        quad = (yc.square() @ inv_var.transpose(-1, -2)  # [..., N, C]
                - 2 * yc @ (mc * inv_var).transpose(-1, -2)
                + (mc.square() * inv_var).sum(-1)[..., None, :]).clamp_min(0.0)
        log_norm = -log_sigma.sum(-1) - 0.5 * self.latent_dim * math.log(2 * math.pi)  # [..., C]
        log_comp = F.log_softmax(logits, -1)[..., None, :] + log_norm[..., None, :] - 0.5 * quad
        return -torch.logsumexp(log_comp, dim=-1)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        y = posterior_samples(target_mu, target_log_sigma, self.cfg.num_samples, generator, dtype=h.dtype)
        return self.nll(h, y).mean(-1)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        logits, means, log_sigma = self.mixture(h)
        u = torch.rand((*logits.shape[:-1], num_samples, self.num_components), generator=generator,
                       device=h.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))  # Gumbel-max: argmax ~ softmax(logits)
        comp = (logits.float()[..., None, :] + gumbel).argmax(-1)  # [..., N]
        idx = comp[..., None].expand(*comp.shape, self.latent_dim)
        m, s = means.gather(-2, idx), log_sigma.gather(-2, idx).exp()
        eps = torch.randn(m.shape, generator=generator, device=h.device, dtype=m.dtype)
        return m + s * eps


class MSEHead(nn.Module):
    """Plain regression: predict the posterior mean, loss = mean over d of (pred − μ)². The optimum is
    E[z | h], so sample() is deterministic (every "sample" is that prediction): the baseline that
    shows what a head loses by not modelling the distribution."""

    evals_per_sample = 1

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.net = ConditionMLP(hidden_size, latent_dim, head_cfg.num_blocks)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        # Regressing on μ rather than on posterior samples has the same minimiser and less variance.
        pred = self.net(h)
        dt = _compute_dtype(pred)
        return (pred.to(dt) - target_mu.detach().to(dt)).square().mean(-1)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        pred = self.net(h)
        return pred[..., None, :].expand(*pred.shape[:-1], num_samples, self.latent_dim).contiguous()


HEADS: dict[str, type] = {
    "energy": EnergyHead,
    "flow": FlowHead,
    "diffusion": DiffusionHead,
    "gmm": GMMHead,
    "mse": MSEHead,
}


def evals_per_sample(head_cfg) -> int:
    """Network evaluations per generated vector of the head a config describes, without building it:
    the head class's ``evals_for(head_cfg)`` where the count depends on the config, else its constant
    ``evals_per_sample`` (the number an instance reports)."""
    cls = HEADS[head_cfg.type]
    return cls.evals_for(head_cfg) if hasattr(cls, "evals_for") else cls.evals_per_sample


def build_head(hidden_size: int, latent_dim: int, head_cfg) -> nn.Module:
    if head_cfg.type not in HEADS:
        raise ValueError(f"model.head.type: unknown head {head_cfg.type!r}; known: {sorted(HEADS)}")
    return HEADS[head_cfg.type](hidden_size, latent_dim, head_cfg)
