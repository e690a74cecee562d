"""FLOPs model of every architecture: the numbers behind MFU, sweeps and the paper's FLOPs table.

Conventions (Kaplan et al. 2020, as the published CALM table uses them):
  * a matmul of m×k by k×n costs 2·m·k·n FLOPs; embedding look-ups, norms and activations are free;
  * causal attention costs 2·layers·context·H per position in the forward pass (QKᵀ and AV over
    half the context on average);
  * training = 3 × forward (backward is twice the forward);
  * CALM counts every head pass, the loss's own matmuls, and the autoencoder: its encoder producing
    the training targets, its decoder turning each generated vector into K tokens at inference;
  * heads (``model.head.type``, one function each, :data:`HEAD_FLOPS`): training counts the network
    on all its training rows per position (energy: N samples; flow, diffusion: N posterior samples,
    each at its own time; gmm, mse: one pass); generation of one vector counts
    ``evals_per_sample`` network evaluations (energy: 1 sample at T = 1; flow: steps × 1 (Euler)
    or 2 (midpoint); diffusion: DDIM steps; gmm, mse: 1) plus what is computed once per position.
"""
from __future__ import annotations

from dataclasses import dataclass

from calm_pretrain.config import AutoencoderConfig, BackboneConfig, CALMConfig, TransformerConfig
from calm_pretrain.models.heads import evals_per_sample

TIME_FEATURES = 256  # sinusoidal features of the flow/diffusion time (heads.TimestepEmbedder's freq_dim)


def _linear(m_in: int, n_out: int) -> int:
    """Forward FLOPs of one row through a Linear(m_in → n_out)."""
    return 2 * m_in * n_out


def backbone_layers_forward(cfg: BackboneConfig, context: int) -> int:
    """Decoder layers, per position: projections + SwiGLU + causal attention over `context`."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    kv = cfg.num_kv_heads * hd
    proj = _linear(h, h) + 2 * _linear(h, kv) + _linear(h, h)
    mlp = 3 * _linear(h, cfg.intermediate_size)
    attention = 2 * context * h
    return cfg.num_layers * (proj + mlp + attention)


def energy_head_forward(cfg: CALMConfig, num_samples: int) -> int:
    """The energy head, per position, for `num_samples` samples (condition terms once per position)."""
    h, blocks = cfg.hidden_size, cfg.head.num_blocks
    per_position = _linear(h, h) + blocks * _linear(h, h)  # hidden_embd + cond half of each first linear
    per_sample = (_linear(cfg.head.noise_size, h)
                  + blocks * (_linear(h, h) + _linear(h, h) + _linear(h, 2 * h) + _linear(h, h))
                  + _linear(h, h) + _linear(h, cfg.latent_dim))
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
    per_row = _linear(d, h) + blocks * 2 * _linear(h, h) + _linear(h, d)
    per_modulation = blocks * _linear(h, 3 * h) + _linear(h, 2 * h)
    per_time = _linear(TIME_FEATURES, h) + _linear(h, h)
    return rows * per_row + modulated_rows * per_modulation + time_rows * per_time


def condition_mlp_forward(cfg: CALMConfig, out_dim: int) -> int:
    """The one-shot heads' network (heads.ConditionMLP), once per position: embed h, `num_blocks`
    residual MLPs, the final layer onto `out_dim`."""
    h, blocks = cfg.hidden_size, cfg.head.num_blocks
    return _linear(h, h) + blocks * 2 * _linear(h, h) + _linear(h, h) + _linear(h, out_dim)


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
    n, cond = cfg.head.num_samples, _linear(cfg.hidden_size, cfg.hidden_size)
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


def autoencoder_encoder_forward(ae: AutoencoderConfig) -> int:
    """Encoder, per chunk: one half of the layers per token, the other half per chunk."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * _linear(h, i)
    half = ae.num_encoder_layers // 2
    return k * half * layer + _linear(k * h, h) + half * layer + _linear(h, 2 * ae.latent_dim)


def autoencoder_decoder_forward(ae: AutoencoderConfig) -> int:
    """Decoder, per chunk, including the tied output projection over the vocabulary for K tokens."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * _linear(h, i)
    half = ae.num_decoder_layers // 2
    return (_linear(ae.latent_dim, h) + half * layer + _linear(h, k * h) + k * half * layer
            + k * _linear(h, ae.vocab_size))


@dataclass
class FlopsBreakdown:
    """FLOPs per *token* by component; `total` is their sum."""

    parts: dict

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))


def training_flops_per_token(cfg, context: int, ae: AutoencoderConfig | None = None) -> FlopsBreakdown:
    """Training FLOPs per token (forward + backward) of a model config at a given context (positions)."""
    if isinstance(cfg, CALMConfig):
        h, k, head = cfg.hidden_size, cfg.k, head_flops(cfg)
        parts = {
            "input compression": 3 * (_linear(k * h, 2 * h) + _linear(2 * h, h)),
            "backbone": 3 * backbone_layers_forward(cfg, context),
            "head": 3 * head.train,
        }
        if head.loss:
            parts[f"{cfg.head.type} loss"] = 3 * head.loss
        if ae is not None:  # frozen: forward only, to produce the targets
            parts["autoencoder"] = autoencoder_encoder_forward(ae)
        return FlopsBreakdown({name: v / k for name, v in parts.items()})
    if isinstance(cfg, TransformerConfig):
        return FlopsBreakdown({
            "backbone": 3 * backbone_layers_forward(cfg, context),
            "output embedding": 3 * _linear(cfg.hidden_size, cfg.vocab_size),
        })
    if isinstance(cfg, AutoencoderConfig):
        enc, dec = autoencoder_encoder_forward(cfg), autoencoder_decoder_forward(cfg)
        return FlopsBreakdown({"encoder": 3 * enc / cfg.k, "decoder": 3 * dec / cfg.k})
    raise TypeError(f"no FLOPs model for {type(cfg).__name__}")


def inference_flops_per_token(cfg, context: int, ae: AutoencoderConfig | None = None) -> FlopsBreakdown:
    """Generation FLOPs per token at a given context; CALM: one head sample per vector (T = 1), with
    all of its network evaluations (head_flops(cfg).generate)."""
    if isinstance(cfg, CALMConfig):
        h, k = cfg.hidden_size, cfg.k
        parts = {
            "input compression": _linear(k * h, 2 * h) + _linear(2 * h, h),
            "backbone": backbone_layers_forward(cfg, context),
            "head": head_flops(cfg).generate,
        }
        if ae is not None:
            parts["autoencoder"] = autoencoder_decoder_forward(ae)
        return FlopsBreakdown({name: v / k for name, v in parts.items()})
    if isinstance(cfg, TransformerConfig):
        return FlopsBreakdown({
            "backbone": backbone_layers_forward(cfg, context),
            "output embedding": _linear(cfg.hidden_size, cfg.vocab_size),
        })
    raise TypeError(f"no inference FLOPs model for {type(cfg).__name__}")
