"""CALM's FLOPs: input compression, backbone, every generative head and its loss, and the frozen
autoencoder around it (conventions in calm_pretrain/flops.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from calm_pretrain.flops import backbone_layers_forward, linear_flops
from calm_pretrain.models.autoencoder.config import AutoencoderConfig
from calm_pretrain.models.autoencoder.flops import autoencoder_decoder_forward, autoencoder_encoder_forward
from calm_pretrain.models.calm.config import CALMConfig
from calm_pretrain.models.calm.heads import evals_per_sample

TIME_FEATURES = 256  # sinusoidal features of the flow/diffusion time (heads.TimestepEmbedder's freq_dim)


def energy_head_forward(cfg: CALMConfig, num_samples: int) -> int:
    """The energy head, per position, for `num_samples` samples (condition terms once per position)."""
    h, blocks = cfg.hidden_size, cfg.head.num_blocks
    per_position = linear_flops(h, h) + blocks * linear_flops(h, h)  # hidden_embd + cond half of each first linear
    per_sample = (linear_flops(cfg.head.noise_size, h)
                  + blocks * (linear_flops(h, h) + linear_flops(h, h) + linear_flops(h, 2 * h) + linear_flops(h, h))
                  + linear_flops(h, h) + linear_flops(h, cfg.latent_dim))
    return per_position + num_samples * per_sample


def energy_loss_forward(cfg: CALMConfig) -> int:
    """Distance matmuls of the energy score per position: N·M model–target and N² model–model."""
    n, m, d = cfg.head.num_samples, cfg.head.num_target_samples, cfg.latent_dim
    return 2 * n * m * d + 2 * n * n * d


def adaln_mlp_forward(cfg: CALMConfig, rows: int, modulated_rows: int, time_rows: int) -> int:
    """One evaluation of the flow/diffusion network (heads.AdaLNMLP), per position, without the
    condition embedding of h (computed once per position): `rows` rows of x (input projection, block
    MLPs, output linear), `modulated_rows` rows of y = time + condition (the AdaLN shift/scale/gate
    linears) and `time_rows` time embeddings (TIME_FEATURES → H → H)."""
    h, d, blocks = cfg.hidden_size, cfg.latent_dim, cfg.head.num_blocks
    per_row = linear_flops(d, h) + blocks * 2 * linear_flops(h, h) + linear_flops(h, d)
    per_modulation = blocks * linear_flops(h, 3 * h) + linear_flops(h, 2 * h)
    per_time = linear_flops(TIME_FEATURES, h) + linear_flops(h, h)
    return rows * per_row + modulated_rows * per_modulation + time_rows * per_time


def condition_mlp_forward(cfg: CALMConfig, out_dim: int) -> int:
    """The one-shot heads' network (heads.ConditionMLP), once per position: embed h, `num_blocks`
    residual MLPs, the final layer onto `out_dim`."""
    h, blocks = cfg.hidden_size, cfg.head.num_blocks
    return linear_flops(h, h) + blocks * 2 * linear_flops(h, h) + linear_flops(h, h) + linear_flops(h, out_dim)


@dataclass(frozen=True)
class HeadFlops:
    """Forward FLOPs of a generative head: `train` per position in a training step (the network on
    all its training rows), `loss` per position (the loss's own matmuls; 0 when it has none) and
    `generate` per generated vector (every network evaluation of one sample, batch size 1)."""

    train: int
    loss: int
    generate: int


def energy_head_flops(cfg: CALMConfig) -> HeadFlops:
    """N samples per position in training, scored by the energy loss; one sample per vector at T = 1."""
    return HeadFlops(train=energy_head_forward(cfg, cfg.head.num_samples), loss=energy_loss_forward(cfg),
                     generate=evals_per_sample(cfg.head) * energy_head_forward(cfg, 1))


def adaln_head_flops(cfg: CALMConfig) -> HeadFlops:
    """Flow and diffusion (the same network; they differ in the path and the sampler). Training: one
    evaluation on the N posterior samples of a position, each at its own time (N rows of x, of y and
    of time embeddings). Generation: evals_per_sample evaluations of one row, each solver step at one
    time shared by the whole batch (its embedding counted once per step, as at batch size 1)."""
    n, cond = cfg.head.num_samples, linear_flops(cfg.hidden_size, cfg.hidden_size)
    return HeadFlops(train=cond + adaln_mlp_forward(cfg, n, n, n), loss=0,
                     generate=cond + evals_per_sample(cfg.head) * adaln_mlp_forward(cfg, 1, 1, 1))


def gmm_head_flops(cfg: CALMConfig) -> HeadFlops:
    """One pass per position gives C mixing logits, means and log σ; the likelihood of N posterior
    samples expands the quadratic form into two [N, d] × [d, C] matmuls."""
    c, d, n = cfg.head.num_components, cfg.latent_dim, cfg.head.num_samples
    net = condition_mlp_forward(cfg, c * (2 * d + 1))
    return HeadFlops(train=net, loss=2 * (2 * n * d * c), generate=evals_per_sample(cfg.head) * net)


def mse_head_flops(cfg: CALMConfig) -> HeadFlops:
    """One pass per position onto the posterior mean; the squared error has no matmul."""
    net = condition_mlp_forward(cfg, cfg.latent_dim)
    return HeadFlops(train=net, loss=0, generate=evals_per_sample(cfg.head) * net)


HEAD_FLOPS = {"energy": energy_head_flops, "flow": adaln_head_flops, "diffusion": adaln_head_flops,
              "gmm": gmm_head_flops, "mse": mse_head_flops}


def head_flops(cfg: CALMConfig) -> HeadFlops:
    """The FLOPs of `cfg.head.type` (heads without an entry in HEAD_FLOPS are refused, not guessed)."""
    if cfg.head.type not in HEAD_FLOPS:
        raise TypeError(f"no FLOPs model for the head {cfg.head.type!r}; known: {sorted(HEAD_FLOPS)}")
    return HEAD_FLOPS[cfg.head.type](cfg)


def training_flops(cfg: CALMConfig, context: int, ae: Optional[AutoencoderConfig] = None) -> dict:
    """Per token, by component; the frozen AE (when given) runs forward only, to produce the targets."""
    h, k, head = cfg.hidden_size, cfg.k, head_flops(cfg)
    parts = {
        "input compression": 3 * (linear_flops(k * h, 2 * h) + linear_flops(2 * h, h)),
        "backbone": 3 * backbone_layers_forward(cfg, context),
        "head": 3 * head.train,
    }
    if head.loss:
        parts[f"{cfg.head.type} loss"] = 3 * head.loss
    if ae is not None:
        parts["autoencoder"] = autoencoder_encoder_forward(ae)
    return {name: v / k for name, v in parts.items()}


def inference_flops(cfg: CALMConfig, context: int, ae: Optional[AutoencoderConfig] = None) -> dict:
    """Per generated token: one head sample per vector (T = 1) with all its network evaluations, and
    the AE decoder turning each vector into K tokens (when given)."""
    h, k = cfg.hidden_size, cfg.k
    parts = {
        "input compression": linear_flops(k * h, 2 * h) + linear_flops(2 * h, h),
        "backbone": backbone_layers_forward(cfg, context),
        "head": head_flops(cfg).generate,
    }
    if ae is not None:
        parts["autoencoder"] = autoencoder_decoder_forward(ae)
    return {name: v / k for name, v in parts.items()}
