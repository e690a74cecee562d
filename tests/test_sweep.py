"""Scaling-law sweeps (tools/sweep.py, calm_pretrain/sweep.py): planning the published K × size grid,
the fit against known numbers, and a whole tiny sweep on the CPU through slurm/*.sbatch and the Slurm
stand-ins: AE training → export → encode → training job arrays → collect → fit → plot."""
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from calm_pretrain.config import load_config
from calm_pretrain.models.registry import inference_flops_per_token, training_flops_per_token
from calm_pretrain.sweep import collect, fit, main, make_plan, plot, read_tables, write_tables
from tests.helpers import REPO, shellcheck

STANDINS = REPO / "tests" / "slurm_standins"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_scaling_plan_covers_k_and_sizes_with_stages_in_order(tmp_path):
    plan = make_plan(REPO / "configs/sweeps/scaling.yaml", tmp_path / "plan")
    calm = [p for p in plan["points"] if p["arch"] == "calm"]
    base = [p for p in plan["points"] if p["arch"] == "transformer"]
    assert sorted({(p["k"], p["size"]) for p in calm}) == sorted((k, s) for k in (1, 2, 4, 8) for s in ("m", "l", "xl"))
    assert sorted(p["size"] for p in base) == ["l", "m", "s"]
    assert [p["index"] for p in plan["points"]] == list(range(15))
    assert sorted(f.name for f in (tmp_path / "plan" / "configs").iterdir()) == [f"{i:04d}.yaml" for i in range(15)]
    assert len({p["run_dir"] for p in plan["points"]}) == 15

    ae4 = load_config(REPO / "configs/ae/ae_k4_d128.yaml").model
    for p in plan["points"]:
        cfg = load_config(p["config"])  # the resolved configs load as they are
        assert cfg.train.output_dir == p["run_dir"] and cfg.name == p["name"]
        if p["arch"] == "calm":
            assert cfg.model.k == p["k"] and p["ae_path"].endswith(f"ae-k{p['k']}/release")
            assert cfg.data.eval is None  # CALM is scored by the eval stage, with its AE
            assert cfg.data.train == [str(REPO / f"data/pile_latents_k{p['k']}")]
            assert cfg.model.latent_dim == {1: 32, 2: 64, 4: 128, 8: 256}[p["k"]]
            assert p["depends_on"] == [f"encode-k{p['k']}"] and p["ae_counted"]
        else:
            assert cfg.data.train == [str(REPO / "data/pile_lm_k1")] and p["depends_on"] == []
            assert cfg.data.eval == str(REPO / "data/wikitext103_test_tok")
        assert p["training_flops"] == pytest.approx(p["training_flops_per_token"] * p["tokens"])

    # The FLOPs are calm_pretrain.flops' (AE encoder share included) and match the published table.
    m4 = next(p for p in calm if (p["k"], p["size"]) == (4, "m"))
    cfg = load_config(m4["config"])
    assert m4["training_flops_per_token"] == training_flops_per_token(cfg.model, 2048, ae4).total
    assert m4["inference_flops_per_token"] == inference_flops_per_token(cfg.model, 2048, ae4).total
    assert m4["tokens"] == 250_000 * 2 ** 21 and abs(m4["training_flops"] / 3.7e20 - 1) < 0.10
    assert abs(m4["params"] / 371.7e6 - 1) < 0.001
    ts = next(p for p in base if p["size"] == "s")
    assert ts["tokens"] == 250_000 * 2 ** 21 and abs(ts["training_flops"] / 6.6e20 - 1) < 0.10

    # Stages: AE (array) → export → encode per K → training arrays, chained with afterok.
    assert [s["k"] for s in plan["stages"]["encode"]] == [1, 2, 4, 8]
    script = (tmp_path / "plan" / "submit.sh").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "plan" / "submit.sh")]).returncode == 0
    order = [script.index(s) for s in ("submit ae --array=0-3", "submit export-ae --dependency=afterok:\"$JOB_AE\"",
                                       "submit encode-k1 --dependency=afterok:\"$JOB_EXPORT_AE\"",
                                       "submit train-0-2 --dependency=afterok:\"$JOB_ENCODE_K1\" --array=0-2",
                                       "submit train-12-14 --array=12-14",
                                       'submit eval --dependency=afterok:"$JOB_TRAIN_0_2":"$JOB_TRAIN_3_5":'
                                       '"$JOB_TRAIN_6_8":"$JOB_TRAIN_9_11":"$JOB_TRAIN_12_14":"$JOB_EXPORT_AE"')]
    assert order == sorted(order)
    assert "slurm/sweep.sbatch \"$PLAN/stages/ae\"" in script and "slurm/encode.sbatch" in script
    assert sorted(f.name for f in (tmp_path / "plan/stages/ae/configs").iterdir()) == [f"{i:04d}.yaml" for i in range(4)]
    assert (tmp_path / "plan/stages/export-ae.sbatch").read_text().count("/release") == 4
    generated = [tmp_path / "plan" / f for f in ("submit.sh", "stages/export-ae.sbatch", "stages/eval.sbatch")]
    for script_path in generated:
        assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    r = subprocess.run([shellcheck(), "--severity=style", *map(str, generated)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    # Re-planning needs --force; the heads sweep (base/grid/overrides only) still plans, without stages.
    with pytest.raises(ValueError, match="--force"):
        make_plan(REPO / "configs/sweeps/scaling.yaml", tmp_path / "plan")
    heads = make_plan(REPO / "configs/sweeps/heads.yaml", tmp_path / "heads")
    assert [p["grid"]["model.head.type"] for p in heads["points"]] == ["energy", "flow", "diffusion", "gmm", "mse"]
    assert not any(heads["stages"].values()) and "sbatch" in (tmp_path / "heads/submit.sh").read_text()
    assert [p["head"] for p in heads["points"]] == ["energy", "flow", "diffusion", "gmm", "mse"]
    assert [p["evals_per_vector"] for p in heads["points"]] == [1, 20, 100, 1, 1]  # 10 midpoint steps, 100 DDIM
    for p in heads["points"]:  # each point's FLOPs are its own head's (calm_pretrain.flops.HEAD_FLOPS)
        cfg = load_config(p["config"])
        assert cfg.model.head.type == p["head"] and cfg.model.latent_dim == 64 and cfg.model.k == 4
        assert p["inference_flops_per_token"] >= inference_flops_per_token(cfg.model, cfg.data.seq_chunks).total  # + AE
    gen = {p["head"]: p["inference_flops_per_token"] for p in heads["points"]}
    assert gen["diffusion"] > gen["flow"] > gen["energy"] and gen["mse"] < gen["gmm"]


def test_fit_recovers_known_lines_and_falls_back_to_eval_history():
    # K=4: three sizes on brierlm = 2 + 1.5·log10(C); K=1: one size, its eval history on 1 + 0.5·log10(C).
    rows = [{"name": f"k4-{i}", "group": "K=4", "training_flops": c, "final_brierlm": 2 + 1.5 * math.log10(c),
             "size": s} for i, (c, s) in enumerate([(1e15, "a"), (1e16, "b"), (1e18, "c")])]
    rows.append({"name": "k1", "group": "K=1", "training_flops": 1e16, "final_brierlm": 9.0, "size": "a"})
    rows.append({"name": "t", "group": "Transformer", "training_flops": 1e16, "final_brierlm": float("nan"), "size": "a"})
    steps = pd.DataFrame([{"name": "k1", "group": "K=1", "arch": "calm", "training_flops": c,
                           "eval_brierlm": 1 + 0.5 * math.log10(c), "loss": 1.0, "tokens": 1}
                          for c in (1e14, 1e15, 1e16)])
    out = fit(pd.DataFrame(rows), steps)
    k4, k1, t = out["groups"]["K=4"], out["groups"]["K=1"], out["groups"]["Transformer"]
    assert k4["points_from"] == "final" and k4["n"] == 3
    assert k4["a"] == pytest.approx(2) and k4["b"] == pytest.approx(1.5) and k4["r2"] == pytest.approx(1)
    assert k1["points_from"] == "eval history" and k1["b"] == pytest.approx(0.5) and k1["a"] == pytest.approx(1)
    assert t["b"] is None and t["n"] == 0
    power = fit(pd.DataFrame(rows[:3]).assign(final_brierlm=lambda d: 3 * d["training_flops"] ** 0.1), None, "power")
    assert power["groups"]["K=4"]["b"] == pytest.approx(0.1) and 10 ** power["groups"]["K=4"]["a"] == pytest.approx(3)


# ---- the whole tiny sweep on the CPU ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PERM = np.random.default_rng(1).permutation(61) + 3  # one "language" for training and evaluation alike


def _sequences(rng, n: int, t: int, perm: np.ndarray = PERM) -> np.ndarray:
    """Learnable token streams: a fixed random permutation of ids 3..63 applied step after step."""
    out = np.empty((n, t), np.int64)
    out[:, 0] = rng.integers(3, 64, n)
    for j in range(1, t):
        out[:, j] = perm[out[:, j - 1] - 3]
    return out


def _valid_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # the IHDR chunk's CRC
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # ends with the (empty) IEND chunk
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_tiny_sweep_end_to_end_through_slurm_standins(tmp_path):
    from tests.helpers.data import write_token_dataset

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_token_dataset(data / "lm", _sequences(rng, 96, 32), k=1, vocab_size=64)
    write_token_dataset(data / "eval", _sequences(rng, 4, 32), k=1, vocab_size=64)
    for k in (1, 2, 4):
        write_token_dataset(data / f"ae_k{k}", _sequences(rng, 64, 8 * k), k=k, vocab_size=64, layout="ae")
    sweep = yaml.safe_load((REPO / "configs/sweeps/tiny_scaling.yaml").read_text())
    sweep["data"].update(tokens=str(data / "lm"), ae_tokens=str(data / "ae_k{k}"), eval=str(data / "eval"))
    sweep["runs"] = str(tmp_path / "runs")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    plan_dir = tmp_path / "plan dir"
    assert main(["plan", str(tmp_path / "sweep.yaml"), "--out", str(plan_dir)]) == 0
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert len(plan["points"]) == 8 and not plan["missing_inputs"]
    assert [s["name"] for s in plan["stages"]["encode"]] == ["encode-k1", "encode-k2", "encode-k4"]

    env = {**os.environ, "PATH": f"{STANDINS}{os.pathsep}{os.environ['PATH']}",
           "SLURM_STANDIN_DIR": str(tmp_path / "slurm-state"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "NPROC_PER_NODE": "1", "WANDB_MODE": "offline",
           "CALM_MASTER_PORT": str(_free_port())}
    env.pop("RANK", None)
    t0 = time.time()
    r = subprocess.run(["bash", str(plan_dir / "submit.sh")], env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((plan_dir / "logs").glob("*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    print(f"submit.sh: {time.time() - t0:.0f}s")
    # Every stage ran, in order, through the sbatch scripts (the stand-in runs each job to its end).
    for k in (1, 2, 4):
        assert (tmp_path / f"runs/ae-k{k}/release/model.safetensors").is_file(), logs
        manifest = json.loads((tmp_path / f"runs/latents-k{k}/manifest.json").read_text())
        assert manifest["complete"] and manifest["k"] == k and manifest["sample_tokens"] == 32
    assert "array task 2 on 1 node(s)" in (plan_dir / "logs/submit-ae.log").read_text()
    assert "encode rank 0/1" in (plan_dir / "logs/submit-encode-k4.log").read_text()

    results = tmp_path / "results" / "tiny.csv"
    assert main(["collect", str(plan_dir), "--out", str(results)]) == 0
    runs, steps = read_tables(results)
    assert len(runs) == 8 and set(runs["status"]) == {"complete"}
    assert sorted(runs["group"].unique()) == ["K=1", "K=2", "K=4", "Transformer"]
    assert (runs.groupby("group").size() == 2).all()
    assert (runs["steps"] == 60).all() and (runs["tokens"] == 60 * 8 * 32).all()
    by_name = {p["name"]: p for p in plan["points"]}
    for _, row in runs.iterrows():
        p = by_name[row["name"]]
        assert row["training_flops_per_token"] == p["training_flops_per_token"] > 0
        assert row["training_flops"] == pytest.approx(p["training_flops_per_token"] * row["tokens"])
        assert row["training_flops"] == pytest.approx(p["training_flops"])  # ran exactly the planned budget
        assert np.isfinite(row["final_loss"]) and np.isfinite(row["final_brierlm"]) and row["final_brierlm"] >= 0
    # The baseline learns the deterministic "language" (CE → 0) and is scored near 100 (the variance-reduced
    # estimator may pass 100 slightly); CALM's energy loss falls, but 60 steps are too few for BrierLM > 0.
    base = runs[runs["arch"] == "transformer"]
    assert (base["final_loss"] < 0.2).all() and (base["final_brierlm"] > 90).all(), base
    for name, d in steps[steps["arch"] == "calm"].groupby("name"):
        assert d["loss"].iloc[-3:].mean() < d["loss"].iloc[:3].mean(), name
    calm = runs[runs["arch"] == "calm"]
    assert sorted(calm["k"].tolist()) == [1, 1, 2, 2, 4, 4] and runs[runs["arch"] == "transformer"]["k"].isna().all()
    # Bigger models cost more per token; a larger K costs less per token at the same size.
    for k, g in calm.groupby("k"):
        assert g.set_index("size").loc["s", "training_flops_per_token"] > g.set_index("size").loc["xs", "training_flops_per_token"]
    xs = calm[calm["size"] == "xs"].sort_values("k")["training_flops_per_token"].tolist()
    assert xs == sorted(xs, reverse=True)
    assert (runs["brierlm_step"] == 60).all()  # the eval stage scored every final checkpoint
    for _, row in runs.iterrows():
        scored = json.loads((Path(row["run_dir"]) / "sweep_eval.json").read_text())
        assert scored["step"] == 60 and scored["brierlm"] == row["final_brierlm"]
    # The per-step table: every step of every run; the baselines also evaluated during training (steps 30, 60).
    assert len(steps) == 8 * 12 and steps["eval_brierlm"].notna().sum() == 2 * 2
    assert set(steps[steps["eval_brierlm"].notna()]["step"]) == {30, 60}
    assert pd.read_parquet(results.with_suffix(".parquet")).shape == runs.shape

    fit_path = tmp_path / "results" / "fit.json"
    assert main(["fit", str(results), "--out", str(fit_path)]) == 0
    result = json.loads(fit_path.read_text())
    assert result["form"] == "loglinear" and set(result["groups"]) == {"K=1", "K=2", "K=4", "Transformer"}
    for group, e in result["groups"].items():
        assert e["points_from"] == "final" and e["n"] == 2
        assert math.isfinite(e["a"]) and math.isfinite(e["b"])
        g = runs[runs["group"] == group]
        for c, v in zip(g["training_flops"], g["final_brierlm"]):  # two points: the line goes through both
            assert e["a"] + e["b"] * math.log10(c) == pytest.approx(v, abs=1e-6)

    plots = tmp_path / "results" / "plots"
    assert main(["plot", str(results), "--fit", str(fit_path), "--out", str(plots)]) == 0
    for name in ("brierlm_vs_flops.png", "loss_curves.png"):
        w, h = _valid_png(plots / name)
        assert w >= 600 and h >= 400
    print(runs[["name", "steps", "tokens", "training_flops", "final_loss", "final_brierlm"]].to_string(index=False))
    print(json.dumps({g: {k: e[k] for k in ("a", "b", "n")} for g, e in result["groups"].items()}))


def test_plot_draws_from_tables_written_by_collect(tmp_path):
    """collect's tables → plot without a fit (a sweep still running), PNGs valid."""
    runs = pd.DataFrame([{"name": "a", "group": "K=4", "arch": "calm", "k": 4, "size": "xs", "training_flops": 1e12,
                          "final_brierlm": 1.0, "final_loss": 0.5}])
    steps = pd.DataFrame([{"name": "a", "group": "K=4", "arch": "calm", "k": 4, "size": "xs", "step": s,
                           "tokens": 100 * s, "training_flops": 1e11 * s, "loss": 1.0 / s} for s in (1, 2, 3)])
    paths = write_tables(runs, steps, tmp_path / "r.parquet")
    assert paths["csv"].is_file() and paths["steps"].is_file()
    r, st = read_tables(paths["parquet"])
    written = plot(r, st, None, tmp_path / "plots")
    assert [p.name for p in written] == ["brierlm_vs_flops.png", "loss_curves.png"]
    for p in written:
        _valid_png(p)


def test_collect_marks_missing_and_partial_runs(tmp_path):
    plan = {"points": [
        {"name": n, "group": "K=4", "arch": "calm", "k": 4, "size": "xs", "params": 1, "context": 8,
         "training_flops_per_token": 10.0, "inference_flops_per_token": 1.0, "tokens_per_step": 64,
         "max_steps": 4, "tokens": 256, "training_flops": 2560.0, "run_dir": str(tmp_path / n)}
        for n in ("done", "partial", "missing")]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    for name, last in (("done", 4), ("partial", 2)):
        (tmp_path / name).mkdir()
        recs = [{"step": s, "loss": 1.0 / s, "tokens": 64} for s in range(1, last + 1)]
        recs[-1]["eval/brierlm"] = 3.0
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "lo')
    runs, steps = collect(tmp_path)
    assert runs.set_index("name")["status"].to_dict() == {"done": "complete", "partial": "partial", "missing": "missing"}
    done = runs.set_index("name").loc["done"]
    assert done["tokens"] == 256 and done["training_flops"] == 2560.0 and done["final_brierlm"] == 3.0
    assert done["final_loss"] == 0.25 and len(steps) == 6  # the line cut short by a kill is skipped


def test_heads_comparison_collect_and_plot(tmp_path):
    """A sweep over model.head.type: collect carries the head, its evaluations per vector, the eval stage's
    Brier-1 and held-out energy score, the training time from the logged step times; plot adds heads.png."""
    heads = {"energy": 1, "flow": 20, "mse": 1}
    plan = {"points": [
        {"name": f"calm-{h}", "group": "K=4", "arch": "calm", "k": 4, "size": None, "head": h, "evals_per_vector": e,
         "params": 1, "context": 8, "training_flops_per_token": 10.0 + e, "inference_flops_per_token": 2.0 * e,
         "tokens_per_step": 64, "max_steps": 4, "tokens": 256, "training_flops": 2560.0, "run_dir": str(tmp_path / h)}
        for h, e in heads.items()]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    for i, h in enumerate(heads):
        (tmp_path / h).mkdir()
        recs = [{"step": s, "loss": 1.0 / s, "tokens": 64, "step_time": 0.5 * (i + 1) * s} for s in range(1, 5)]
        (tmp_path / h / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        scored = {"step": 4, "brierlm": float(i), "brier_1": 0.1 * i, "brier_2": 0.0, "energy_score": 10.0 - i}
        (tmp_path / h / "sweep_eval.json").write_text(json.dumps(scored))
    runs, steps = collect(tmp_path)
    r = runs.set_index("head")
    assert r["evals_per_vector"].to_dict() == heads
    assert r["final_brierlm"].tolist() == [0.0, 1.0, 2.0] and r["final_brier_1"].tolist() == pytest.approx([0, 0.1, 0.2])
    assert r["final_energy_score"].tolist() == [10.0, 9.0, 8.0]
    # mean step time (1+2+3+4)/4 · 0.5 · (i+1) = 1.25 · (i+1) per step, times 4 steps
    assert r["seconds_per_step"].tolist() == pytest.approx([1.25, 2.5, 3.75])
    assert r["train_seconds"].tolist() == pytest.approx([5.0, 10.0, 15.0])
    paths = write_tables(runs, steps, tmp_path / "results.csv")
    written = plot(*read_tables(paths["csv"]), None, tmp_path / "plots")
    assert [p.name for p in written] == ["brierlm_vs_flops.png", "loss_curves.png", "heads.png"]
    w, h = _valid_png(written[-1])
    assert w >= 600 and h >= 400 and written[-1].stat().st_size < 200_000
