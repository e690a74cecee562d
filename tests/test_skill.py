"""Energy skill (calm_pretrain.skill) against closed forms, brute force and replication."""
import math

import pytest
import torch

from calm_pretrain.brier import _totals, brier_lm
from calm_pretrain.skill import (energy_scores, marginal_draws, posterior_draws, skill_summary)


def brute_force_energy_score(x, y):
    """2·mean‖x_n − y_m‖ − mean_{n≠n'}‖x_n − x_n'‖, one position at a time, in float64 loops."""
    out = []
    for xp, yp in zip(x.double(), y.double()):
        n, m = len(xp), len(yp)
        xy = sum(float((a - b).norm()) for a in xp for b in yp) / (n * m)
        xx = sum(float((xp[i] - xp[j]).norm()) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        out.append(2 * xy - xx)
    return torch.tensor(out, dtype=torch.float64)


def test_energy_scores_match_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 6, 3, generator=g), torch.randn(5, 7, 3, generator=g) + 0.5
    assert torch.allclose(energy_scores(x, y), brute_force_energy_score(x, y), rtol=1e-10, atol=1e-12)


def mean_abs_normal(mean: float, var: float) -> float:
    """E|D| for D ~ N(mean, var), in closed form."""
    s = math.sqrt(var)
    return s * math.sqrt(2 / math.pi) * math.exp(-mean ** 2 / (2 * var)) + mean * math.erf(mean / (s * math.sqrt(2)))


def test_expected_energy_score_matches_the_closed_form_for_gaussians():
    # model N(a, s²), target posterior N(b, t²) in one dimension: E ES = 2 E|X − Y| − E|X − X'|
    a, s, b, t = 0.4, 0.7, -0.2, 0.3
    g = torch.Generator().manual_seed(1)
    p = 20000
    x = a + s * torch.randn(p, 8, 1, generator=g, dtype=torch.float64)
    y = posterior_draws(torch.full((p, 1), b), torch.full((p, 1), math.log(t)), 16, g)
    scores = energy_scores(x, y)
    expected = 2 * mean_abs_normal(a - b, s * s + t * t) - mean_abs_normal(0.0, 2 * s * s)
    se = float(scores.std()) / math.sqrt(p)
    assert abs(float(scores.mean()) - expected) < 4 * se, (float(scores.mean()), expected, se)


def toy_pool(p: int, sigma: float, g):
    """Positions whose true next-chunk posterior is N(mu_i, sigma²), mu_i ~ N(0, 1), in 1-D."""
    mu = torch.randn(p, 1, generator=g)
    return mu, torch.full_like(mu, math.log(sigma))


def toy_skill(mu, log_sigma, model: str, g) -> dict:
    y = posterior_draws(mu, log_sigma, 16, g)
    x = posterior_draws(mu, log_sigma, 8, g) if model == "posterior" else marginal_draws(mu, log_sigma, 8, g)
    return skill_summary(energy_scores(x, y), energy_scores(marginal_draws(mu, log_sigma, 8, g), y))


def test_a_model_that_samples_the_true_posterior_has_the_closed_form_skill():
    # ES(Q, Q) = E|X − X'| = 2σ/√π; the marginal N(0, 1 + σ²) against Q: 2·sqrt((1 + σ²)/π).
    # So the expected skill of the true posterior is 1 − σ / sqrt(1 + σ²).
    sigma, g = 0.3, torch.Generator().manual_seed(2)
    mu, log_sigma = toy_pool(8000, sigma, g)
    r = toy_skill(mu, log_sigma, "posterior", g)
    expected = 1 - sigma / math.sqrt(1 + sigma ** 2)
    assert abs(r["energy_skill"] - expected) < 4 * r["energy_skill_se"], (r, expected)
    assert r["energy_score"] == pytest.approx(2 * sigma / math.sqrt(math.pi), rel=0.02)
    assert r["marginal_energy_score"] == pytest.approx(2 * math.sqrt((1 + sigma ** 2) / math.pi), rel=0.03)


def test_a_model_that_samples_the_marginal_has_zero_skill_and_honest_standard_errors():
    g = torch.Generator().manual_seed(3)
    runs = [toy_skill(*toy_pool(1000, 0.3, g), "marginal", g) for _ in range(40)]
    skills = torch.tensor([r["energy_skill"] for r in runs], dtype=torch.float64)
    reported_se = sum(r["energy_skill_se"] for r in runs) / len(runs)
    # zero in expectation: the mean of 40 replications is within 4 standard errors of 0
    assert abs(float(skills.mean())) < 4 * float(skills.std()) / math.sqrt(len(runs))
    # the delta-method standard error agrees with the spread across replications
    assert 0.7 < reported_se / float(skills.std()) < 1.4, (reported_se, float(skills.std()))


def test_the_marginal_never_samples_the_position_itself():
    mu = torch.arange(5, dtype=torch.float64)[:, None] * 100.0
    draws = marginal_draws(mu, torch.full_like(mu, -30.0), 200, torch.Generator().manual_seed(4))
    own = (draws.round() == mu[:, None, :]).all(-1)
    assert not own.any()
    assert len(set(draws[0, :, 0].round().tolist())) == 4  # every other position is drawn


def test_brier_standard_errors_per_position_and_clustered_by_block():
    g = torch.Generator().manual_seed(5)
    est = torch.randint(-1, 3, (3, 50, 4), generator=g).double()
    valid = torch.ones(50, 4, dtype=torch.bool)
    valid[-3:, 2:] = False
    totals = _totals(est, valid)
    per_position = brier_lm({k: v for k, v in totals.items() if not k.startswith("block_")})
    clustered = brier_lm(totals)
    for n in range(4):
        vals = est[:, valid[:, n], n]  # [blocks, positions]
        assert per_position[f"brier_{n + 1}"] == pytest.approx(float(vals.mean()))
        assert per_position[f"brier_{n + 1}_se"] == pytest.approx(float(vals.std()) / math.sqrt(vals.numel()))
        # clustered by block: every block holds the same number of positions, so the ratio estimator's
        # error is the standard error of the three block means
        assert clustered[f"brier_{n + 1}_se"] == pytest.approx(float(vals.mean(1).std()) / math.sqrt(3))


def test_calm_skill_on_a_real_model_against_the_broadcast_formula():
    """calm_skill end to end (a real CALM and AE) against energy_loss_direct in float64 and an explicit
    decode, with the mse head (deterministic samples: its prediction) and a replay of the same draws."""
    from calm_pretrain.models.autoencoder import AutoencoderConfig
    from calm_pretrain.models.calm import CALMConfig, HeadConfig
    from calm_pretrain.skill import calm_skill
    from calm_pretrain.losses import energy_loss_direct
    from calm_pretrain.models import build_model

    torch.manual_seed(0)
    shape = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ae = build_model(AutoencoderConfig(**shape, k=2, latent_dim=4, hidden_size=16, intermediate_size=24)).eval()
    calm = build_model(CALMConfig(**shape, k=2, latent_dim=4, hidden_size=16, intermediate_size=32, num_layers=1,
                                  num_heads=2, num_kv_heads=2, max_position_embeddings=32,
                                  head=HeadConfig(type="mse", num_blocks=1))).eval()
    torch.nn.init.normal_(calm.head.net.final_layer.linears[2].weight)  # not the zero-initialised output
    blocks = [torch.randint(3, 64, (1, 12)) for _ in range(3)]  # 6 chunks each: 5 predicted
    n, m = 3, 5
    got = calm_skill(calm, ae, blocks, num_samples=n, num_target_samples=m, generator=torch.Generator().manual_seed(7))

    with torch.no_grad():
        pred = torch.cat([calm.head.net(calm.hidden_states(ids)[:, :-1])[0] for ids in blocks]).double()  # [15, 4]
        post = [ae.encode(ids) for ids in blocks]
        tokens = torch.cat([ae.decode(calm.head.net(calm.hidden_states(ids)[:, :-1])).argmax(-1)[0] for ids in blocks])
    mu = torch.cat([p[0][0, 1:] for p in post]).double()
    sigma = torch.cat([p[1][0, 1:] for p in post]).double().exp()
    gen = torch.Generator().manual_seed(7)  # the draw order of calm_skill: targets, then the marginal's draws
    y = mu[:, None] + sigma[:, None] * torch.randn((15, m, 4), generator=gen, dtype=torch.float64)
    other = (torch.arange(15)[:, None] + torch.randint(1, 15, (15, n), generator=gen)) % 15
    marginal = mu[other] + sigma[other] * torch.randn((15, n, 4), generator=gen, dtype=torch.float64)
    model_es = energy_loss_direct(pred[:, None].expand(15, n, 4), y)
    marginal_es = energy_loss_direct(marginal, y)
    assert got["energy_score"] == pytest.approx(float(model_es.mean()), rel=1e-9)
    assert got["marginal_energy_score"] == pytest.approx(float(marginal_es.mean()), rel=1e-9)
    assert got["energy_skill"] == pytest.approx(1 - float(model_es.mean() / marginal_es.mean()), rel=1e-9)
    gold = torch.cat([ids[0, 2:] for ids in blocks])
    assert got["token_accuracy"] == pytest.approx(float((tokens == gold).double().mean()))
    assert got["skill_positions"] == 15


def test_clustered_standard_errors_match_the_spread_across_replications():
    """Positions of one block share an offset (one document): the block-clustered standard error of a
    mean (and of the skill ratio) agrees with the spread over replications; the per-position one is
    far too small, which is why evaluations cluster by block."""
    from calm_pretrain.brier import ratio_standard_error

    g = torch.Generator().manual_seed(6)
    blocks, per_block = 30, 40
    means, clustered, naive, skills, skill_se = [], [], [], [], []
    for _ in range(200):
        offset = torch.randn(blocks, 1, generator=g, dtype=torch.float64).expand(-1, per_block)
        model = 10 + offset + 0.5 * torch.randn(blocks, per_block, generator=g, dtype=torch.float64)
        marginal = 11 + offset + 0.5 * torch.randn(blocks, per_block, generator=g, dtype=torch.float64)
        means.append(float(model.mean()))
        clustered.append(float(ratio_standard_error(model.sum(1), torch.full((blocks,), float(per_block)))))
        naive.append(float(model.std()) / math.sqrt(model.numel()))
        ids = torch.arange(blocks)[:, None].expand(-1, per_block).flatten()
        r = skill_summary(model.flatten(), marginal.flatten(), ids)
        skills.append(r["energy_skill"])
        skill_se.append(r["energy_skill_se"])
    spread = float(torch.tensor(means).std())
    assert 0.8 < (sum(clustered) / len(clustered)) / spread < 1.25
    assert (sum(naive) / len(naive)) / spread < 0.5  # the per-position error bar would be overconfident
    assert 0.8 < (sum(skill_se) / len(skill_se)) / float(torch.tensor(skills).std()) < 1.25
