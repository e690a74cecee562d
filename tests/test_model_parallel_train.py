"""Tensor and pipeline parallelism through `calm-pretrain train` (real rank processes, gloo): TP=2
reproduces the unsplit run and exports the same weights; TP=2 × PP=2 on 4 processes trains, stops and
resumes to the same losses as a run straight through."""
import pytest
import torch

from calm_pretrain.parallel.tensor import split_dim_of
from calm_pretrain.train.checkpoint import consolidated_state_dict, resolve_checkpoint
from calm_pretrain.safe_load import safe_load
from tests.helpers.runs import read_log, read_losses, run_train, train_config


@pytest.mark.slow
def test_tensor_parallel_run_matches_the_unsplit_run_and_exports_the_same_weights(tmp_path, data, capfd):
    flat, split = tmp_path / "flat", tmp_path / "split"
    assert run_train(train_config(tmp_path / "f.yaml", data, flat, max_steps=6), flat, world_size=1) == [0], read_log(flat)
    cfg = train_config(tmp_path / "s.yaml", data, split, max_steps=6)
    assert run_train(cfg, split, world_size=2, extra=["parallel.tensor=2"]) == [0, 0], read_log(split)
    log = read_log(split)
    assert "tensor parallel: " in log and "tp 1/2 dp 0/1 pp 0/1" in log
    import re  # the whole model's count, as the unsplit run reports it, and rank 0's share beside it

    total = re.search(r"\] \w+, ([\d.]+)M parameters,", read_log(flat)).group(1)
    share = re.search(rf"\] \w+, {total}M parameters \(([\d.]+)M on rank 0 at TP 2 × PP 1\)", log)
    assert share and float(share.group(1)) < float(total), log
    a, b = read_losses(flat), read_losses(split)
    assert [r[0] for r in b] == list(range(1, 7)) and a[0][1] != a[-1][1]
    for (_, x, gx), (_, y, gy) in zip(a, b):  # CALM: the replicated head draws the same noise on both ranks
        assert abs(x - y) < 1e-4 * abs(x) and abs(gx - gy) < 1e-3 * abs(gx), (a, b)
    capfd.readouterr()
    (sa, _), (sb, model_cfg) = consolidated_state_dict(flat), consolidated_state_dict(split)
    assert capfd.readouterr() == ("", "")  # DeepSpeed's consolidation progress is not shown to a user
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-3, atol=1e-5)
    # Consolidation goes through DeepSpeed's universal conversion, guided by the merge rules the checkpoint
    # carries: it joins the TP slices of every CALM parameter (head, compression, norms replicated) as the
    # plan split them. Independently: each TP rank's own module weights (fp32: the master weights), merged
    # along the plan's split dimensions.
    engine = resolve_checkpoint(split) / "engine"
    ranks = [safe_load(engine / f"mp_rank_0{r}_model_states.pt")["module"] for r in (0, 1)]
    for name, weight in sb.items():
        dim = split_dim_of(name)
        merged = ranks[0][name] if dim is None else torch.cat([s[name] for s in ranks], dim=dim)
        if name == "transformer.embed_tokens.weight":
            merged = merged[:model_cfg.vocab_size]
        assert torch.equal(merged, weight), name


@pytest.mark.slow
def test_tp2_pp2_trains_and_resumes(tmp_path, data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["parallel.tensor=2", "parallel.pipeline=2"]
    cfg = train_config(tmp_path / "s.yaml", data, straight, arch="transformer", max_steps=6)
    assert run_train(cfg, straight, world_size=4, extra=extra) == [0] * 4, read_log(straight)
    first = train_config(tmp_path / "a.yaml", data, resumed, arch="transformer", max_steps=3)
    assert run_train(first, resumed, world_size=4, extra=extra) == [0] * 4, read_log(resumed)
    rest = train_config(tmp_path / "b.yaml", data, resumed, arch="transformer", max_steps=6)
    assert run_train(rest, resumed, world_size=4, extra=extra) == [0] * 4, read_log(resumed)
    log = read_log(resumed)
    assert "resumed from" in log and "tp 1/2 dp 0/1 pp 1/2" in log
    a = read_losses(straight)
    assert a[0][1] != a[-1][1]  # random tokens: the loss moves, it need not fall in 6 steps
    assert read_losses(resumed) == a  # bit for bit
    # Exported, the TP×PP checkpoint is the model the same training gives without any parallelism.
    flat = tmp_path / "flat"
    assert run_train(train_config(tmp_path / "f.yaml", data, flat, arch="transformer", max_steps=6), flat,
                world_size=1) == [0], read_log(flat)
    for (_, x, _), (_, y, _) in zip(read_losses(flat), a):
        assert abs(x - y) < 1e-4 * abs(x)
    (split_state, cfg), (flat_state, _) = consolidated_state_dict(straight), consolidated_state_dict(flat)
    assert split_state.keys() == flat_state.keys()
    from calm_pretrain.models import build_model

    models = []
    for state in (split_state, flat_state):
        model = build_model(cfg)
        model.load_state_dict(state)
        models.append(model.eval())
    ids = torch.randint(3, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(models[0].logits(ids), models[1].logits(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_same_training(tmp_path, data):
    """One run, four layouts on two processes: TP=2 for steps 1-2, then PP=2, then plain DP=2, then TP=2
    again. Each resume converts the checkpoint (TP slices merged or split, pipeline names mapped to the
    model's and back, DP partitions re-cut) and the losses follow the straight unsplit run."""
    vocab = ["model.vocab_size=65"]  # odd: at TP=2 the embedding is padded to 66 rows, and unpadded on merge
    straight = tmp_path / "straight"
    assert run_train(train_config(tmp_path / "s.yaml", data, straight, arch="transformer", max_steps=8), straight,
                world_size=1, extra=vocab) == [0], read_log(straight)
    moved = tmp_path / "moved"
    # The same global batch (4 samples) at every layout: DP=2 takes one micro-batch per step, not two.
    legs = [(2, ["parallel.tensor=2"]), (4, ["parallel.pipeline=2"]), (6, ["train.grad_accum_steps=1"]),
            (8, ["parallel.tensor=2"])]
    for steps, extra in legs:
        cfg = train_config(tmp_path / f"m{steps}.yaml", data, moved, arch="transformer", max_steps=steps, save_every=2)
        assert run_train(cfg, moved, world_size=2, extra=vocab + extra) == [0, 0], read_log(moved)
    log = read_log(moved)
    for was, now in (("TP=2 PP=1 DP=1", "TP=1 PP=2 DP=1"), ("TP=1 PP=2 DP=1", "TP=1 PP=1 DP=2"),
                     ("TP=1 PP=1 DP=2", "TP=2 PP=1 DP=1")):
        assert f"resuming at layout {now} (was {was})" in log, log
    a, b = read_losses(straight), read_losses(moved)
    assert [r[0] for r in b] == list(range(1, 9)) and a[0][1] != a[-1][1]
    for (_, x, gx), (_, y, gy) in zip(a, b):  # fp32 sums in another order: TP all-reduces, DP averages
        assert abs(x - y) < 1e-4 * abs(x) and abs(gx - gy) < 1e-3 * abs(gx), (a, b)
