"""FLOPs of every generative head (calm_pretrain.flops.HEAD_FLOPS) against torch's FLOP counter.

The real head modules run under torch.utils.flop_counter.FlopCounterMode, which counts matmul FLOPs
(2·m·k·n per matmul, as the model does); the analytical counts must agree exactly. Norms, activations,
the samplers' elementwise updates and the energy score's direct model–model distances (cdist without
matmul) are not matmuls and are not counted by torch."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.calm.flops import head_flops
from calm_pretrain.models.registry import inference_flops_per_token, training_flops_per_token
from calm_pretrain.models.calm.heads import build_head, evals_per_sample, HEADS

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, k=4, latent_dim=8)
HEAD = dict(num_blocks=2, noise_size=16, num_samples=5, num_target_samples=6, diffusion_train_steps=50,
            num_components=3)
CASES = [
    ("energy", {}),
    ("flow", dict(flow_steps=3, flow_solver="midpoint")),
    ("flow", dict(flow_steps=4, flow_solver="euler")),
    ("diffusion", dict(diffusion_steps=4)),
    ("diffusion", dict(diffusion_steps=7)),
    ("gmm", {}),
    ("mse", {}),
]
IDS = [f"{t}-" + "-".join(f"{v}" for v in kw.values()) if kw else t for t, kw in CASES]


def _config(head_type: str, **head) -> CALMConfig:
    return CALMConfig(**SHAPE, head=HeadConfig(type=head_type, **{**HEAD, **head}))


def _matmul_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return sum(counter.get_flop_counts()["Global"].values())


def test_every_registered_head_has_a_flops_model():
    for head_type in HEADS:
        assert head_flops(_config(head_type)).generate > 0


def test_evals_per_sample_of_a_config_is_what_the_built_head_reports():
    expected = {("energy", ()): 1, ("gmm", ()): 1, ("mse", ()): 1,
                ("flow", (("flow_steps", 10), ("flow_solver", "midpoint"))): 20,  # the reference's 20
                ("flow", (("flow_steps", 7), ("flow_solver", "euler"))): 7,
                ("diffusion", (("diffusion_steps", 100),)): 100}
    for (head_type, knobs), n in expected.items():
        cfg = HeadConfig(type=head_type, **dict(knobs))
        assert evals_per_sample(cfg) == n
        assert build_head(16, 4, cfg).evals_per_sample == n


@pytest.mark.parametrize("head_type,knobs", CASES, ids=IDS)
def test_training_forward_matches_the_flop_counter(head_type, knobs):
    """head.loss on P positions: the network on all its training rows plus the loss's matmuls."""
    torch.manual_seed(0)
    cfg = _config(head_type, **knobs)
    head = build_head(cfg.hidden_size, cfg.latent_dim, cfg.head)
    positions = 7
    h = torch.randn(positions, cfg.hidden_size)
    mu, log_sigma = torch.randn(positions, cfg.latent_dim), torch.full((positions, cfg.latent_dim), -1.0)
    counted = _matmul_flops(lambda: head.loss(h, mu, log_sigma))
    f = head_flops(cfg)
    loss = f.loss
    if head_type == "energy":  # the Gram matmul of the N·M model–target distances only: the N² model–model
        n, m, d = cfg.head.num_samples, cfg.head.num_target_samples, cfg.latent_dim  # distances are direct
        loss = 2 * n * m * d
    assert counted == positions * (f.train + loss)


@pytest.mark.parametrize("head_type,knobs", CASES, ids=IDS)
def test_generation_of_one_vector_matches_the_flop_counter(head_type, knobs):
    """head.sample of one vector (batch size 1, one position): every network evaluation of the sampler."""
    torch.manual_seed(0)
    cfg = _config(head_type, **knobs)
    head = build_head(cfg.hidden_size, cfg.latent_dim, cfg.head)
    counted = _matmul_flops(lambda: head.sample(torch.randn(1, cfg.hidden_size), 1))
    assert counted == head_flops(cfg).generate


def test_iterative_heads_cost_their_evaluations():
    """Generation grows by one network evaluation per added evaluation, measured; the one-shot heads
    cost one evaluation, so flow (20 evaluations) costs about 20 times its one-step counterpart."""
    def measured(head_type, **knobs):
        cfg = _config(head_type, **knobs)
        head = build_head(cfg.hidden_size, cfg.latent_dim, cfg.head)
        return _matmul_flops(lambda: head.sample(torch.randn(1, cfg.hidden_size), 1))
    one = measured("flow", flow_steps=1, flow_solver="euler")
    two = measured("flow", flow_steps=2, flow_solver="euler")
    per_eval = two - one
    assert measured("flow", flow_steps=10, flow_solver="midpoint") == one + 19 * per_eval
    assert measured("diffusion", diffusion_steps=20) == one + 19 * per_eval  # same network, one per step


@pytest.mark.parametrize("head_type", sorted(HEADS))
def test_per_token_totals_use_the_head(head_type):
    """The head's share of training (3 × forward) and of generation, per token (÷ K), in the totals."""
    cfg = _config(head_type)
    f = head_flops(cfg)
    train = training_flops_per_token(cfg, context=8).parts
    assert train["head"] == 3 * f.train / cfg.k
    assert train.get(f"{head_type} loss", 0) == 3 * f.loss / cfg.k
    assert inference_flops_per_token(cfg, context=8).parts["head"] == f.generate / cfg.k
    backbone_only = {k: v for k, v in train.items() if k in ("input compression", "backbone")}
    other = training_flops_per_token(_config("mse"), context=8).parts
    assert backbone_only == {k: other[k] for k in backbone_only}  # only the head's parts differ
