"""Energy skill of reference predictors on the main job's held-out set: where a CALM could get to.

Each predictor samples latents for every held-out position and is scored exactly as a CALM's head is
(calm_pretrain.skill: energy score against the AE posterior of the true next chunk, relative to
the marginal predictor). The conditional ones are built from the training latents (the CALM's own
training data), so they are honest predictors of held-out text:
  marginal (Gaussian)      N(mean, covariance) of all training latents: no context, one smooth blob
  bigram mixture           the posteriors of training chunks that follow the same token as this one
  bigram Gaussian          N(E[mu | last token of the current chunk], residual covariance)
  first token known        the posteriors of training chunks that start with the true next token
                           (an oracle for the next token only)
  true posterior           samples of the true next chunk's own posterior (the best possible)
and the fraction of the latent-mean variance each conditioning explains (R²).

    python3 tools/study/reference_predictors.py [runs/demo_full] [--blocks 256] [--json out.json]
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    from calm_pretrain.skill import energy_scores, marginal_draws, posterior_draws, skill_summary
    from calm_pretrain.eval.source import heldout_blocks
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.loader import ShardLoader

    p = argparse.ArgumentParser()
    p.add_argument("demo", nargs="?", default="runs/demo_full")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    demo = Path(args.demo)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ae = load_autoencoder(demo / "release/ae").eval()
    k, n = ae.config.k, 8
    with ShardLoader(demo / "data/latents", global_batch_size=64, seed=0, prefetch=0) as loader:
        train = [next(loader) for _ in range(loader.samples_per_epoch // 64)]
    t_ids = torch.cat([b["ids"] for b in train])
    t_chunks = t_ids.reshape(t_ids.shape[0], -1, k)
    t_mu = torch.cat([b["mu"] for b in train]).double()[:, 1:].flatten(0, 1)
    t_ls = torch.cat([b["log_sigma"] for b in train]).double()[:, 1:].flatten(0, 1)
    t_prev, t_first = t_chunks[:, :-1, -1].flatten(), t_chunks[:, 1:, 0].flatten()

    ids = torch.cat(heldout_blocks(demo / "data/heldout", args.blocks))
    with torch.no_grad():
        mu, ls = ae.encode(ids)
    chunks = ids.reshape(ids.shape[0], -1, k)
    prev, first = chunks[:, :-1, -1].flatten(), chunks[:, 1:, 0].flatten()
    mu, ls = mu[:, 1:].flatten(0, 1).double(), ls[:, 1:].flatten(0, 1).double()
    blocks = torch.arange(ids.shape[0])[:, None].expand(-1, chunks.shape[1] - 1).flatten()
    y = posterior_draws(mu, ls, 32, g)
    marginal = energy_scores(marginal_draws(mu, ls, n, g), y)

    def mixture(keys_train, keys_eval):
        index = defaultdict(list)
        for i, key in enumerate(keys_train.tolist()):
            index[key].append(i)
        out = torch.empty(len(keys_eval), n, mu.shape[1], dtype=torch.float64)
        for i, key in enumerate(keys_eval.tolist()):
            cand = torch.tensor(index.get(key) or range(len(t_mu)))
            sel = cand[torch.randint(len(cand), (n,), generator=g)]
            out[i] = t_mu[sel] + t_ls[sel].exp() * torch.randn(n, mu.shape[1], generator=g, dtype=torch.float64)
        return out

    def cond_mean(keys_train):
        vocab = int(max(t_ids.max(), ids.max())) + 1
        s = torch.zeros(vocab, mu.shape[1], dtype=torch.float64).index_add_(0, keys_train, t_mu)
        c = torch.bincount(keys_train, minlength=vocab).double()[:, None]
        return (s + 5 * t_mu.mean(0)) / (c + 5)  # shrunk towards the global mean for rare tokens

    def gaussian(mean, resid):
        chol = torch.linalg.cholesky(torch.cov(resid.T) + 1e-6 * torch.eye(resid.shape[1], dtype=torch.float64))
        return mean[:, None, :] + torch.randn(mean.shape[0], n, mean.shape[1], generator=g, dtype=torch.float64) @ chol.T

    total_var = ((mu - t_mu.mean(0)) ** 2).sum(-1).mean()
    predictors = {
        "marginal (Gaussian)": (gaussian(t_mu.mean(0).expand(len(mu), -1), t_mu - t_mu.mean(0)), None),
        "bigram mixture": (mixture(t_prev, prev), cond_mean(t_prev)[prev]),
        "bigram Gaussian": (gaussian(cond_mean(t_prev)[prev], t_mu - cond_mean(t_prev)[t_prev]), None),
        "first token known": (mixture(t_first, first), cond_mean(t_first)[first]),
        "true posterior": (posterior_draws(mu, ls, n, g), None),
    }
    out = {"positions": len(mu), "blocks": ids.shape[0]}
    print(f"{len(mu):,} held-out positions in {ids.shape[0]} blocks; skill ± s.e. (clustered by block)")
    for name, (samples, mean) in predictors.items():
        r = skill_summary(energy_scores(samples, y), marginal, blocks)
        r2 = float(1 - ((mu - mean) ** 2).sum(-1).mean() / total_var) if mean is not None else None
        out[name] = {"energy_skill": r["energy_skill"], "energy_skill_se": r["energy_skill_se"], "r2_of_mean": r2}
        print(f"  {name:<22} skill {r['energy_skill']:+.4f} ± {r['energy_skill_se']:.4f}"
              + (f"   R² of the conditional mean {r2:.3f}" if r2 is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
