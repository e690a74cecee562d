"""CALM's iterative heads (calm_pretrain/models/calm/heads.py lists every head): flow matching with an
Euler or midpoint ODE sampler, and cosine-schedule ε-prediction diffusion with a DDIM sampler. Both share
one AdaLN-modulated MLP over (x, time, condition)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from calm_pretrain.models.calm.head_blocks import compute_dtype, posterior_samples


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


class _AdaLNHead(nn.Module):
    """What flow and diffusion share: the AdaLN network over (x, time, condition) and the number of
    network evaluations one sample takes (``evals_for``, each head's own)."""

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.net = AdaLNMLP(hidden_size, latent_dim, head_cfg.num_blocks)
        self.evals_per_sample = self.evals_for(head_cfg)

    @staticmethod
    def evals_for(head_cfg) -> int:
        raise NotImplementedError


class FlowHead(_AdaLNHead):
    """Flow matching (rectified-flow path): x_t = (1−t)·x0 + t·x1, x0 ~ N(0, I), x1 a posterior
    sample, t ~ U(0, 1); the network regresses the path's velocity x1 − x0 (docs/method.md,
    'Alternative generative heads').

    Sampling integrates dx/dt = v(x, t, h) from t = 0 (noise) to 1 with ``flow_steps`` equal steps of
    the Euler or the midpoint solver (1 or 2 network evaluations per step). The reference uses the
    midpoint solver with 20 evaluations, i.e. the defaults flow_steps = 10, flow_solver = midpoint.
    """


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
        dt = compute_dtype(v)
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
            t = torch.tensor(i * dt, device=h.device, dtype=compute_dtype(h))
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


class DiffusionHead(_AdaLNHead):
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
        super().__init__(hidden_size, latent_dim, head_cfg)
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
        dt = compute_dtype(pred)
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
