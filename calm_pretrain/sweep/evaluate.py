"""The eval stage: each point's newest checkpoint scored on the plan's held-out shards, and the export
of the sweep's trained autoencoders (the two commands the plan's stage scripts run)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from calm_pretrain.config import load_config
from calm_pretrain.models import spec_of
from calm_pretrain.sweep.collect import EVAL_FILE, read_records
from calm_pretrain.sweep.errors import SweepError
from data_pipeline.files import atomic_write_json


def evaluate_point(point: dict, eval_dir: str, log=print, max_blocks: Optional[int] = None) -> dict:
    """BrierLM of a point's newest checkpoint on `eval_dir` (a CALM also gets its energy skill and score,
    calm_pretrain.skill), written to <run_dir>/sweep_eval.json.

    The same evaluation as the trainer's periodic one (calm_pretrain.train_command.build_evaluator), run
    after training. CALM training configs carry no model.ae_path (training on pre-encoded latents does
    not need the autoencoder), so CALM is scored here, with the AE of its K."""
    import torch

    from calm_pretrain.config import config_from_dict
    from calm_pretrain.train.checkpoint import read_trainer_state, resolve_checkpoint, trained_model
    from calm_pretrain.train_command import build_evaluator, load_frozen_autoencoder

    run_dir = Path(point["run_dir"])
    ckpt = resolve_checkpoint(run_dir)
    step = int(read_trainer_state(ckpt).get("step", 0))
    cfg = load_config(point["config"])
    tree = cfg.to_dict()
    tree["data"]["eval"] = eval_dir
    if max_blocks:
        tree["eval"]["max_blocks"] = max_blocks
    if point.get("ae_path"):
        tree["model"]["ae_path"] = point["ae_path"]
    cfg = config_from_dict(tree)
    model = trained_model(ckpt)
    ae = load_frozen_autoencoder(cfg)
    evaluate = build_evaluator(cfg, ae)
    with torch.no_grad():
        scores = evaluate(model)
    result = {"step": step, "checkpoint": str(ckpt), "eval": eval_dir, **scores}
    atomic_write_json(run_dir / EVAL_FILE, result)  # its presence means "scored": never half-written
    log(f"{point['name']}: step {step} BrierLM {scores.get('brierlm', float('nan')):.4f}"
        + (f" energy skill {scores['energy_skill']:.4f} ± {scores['energy_skill_se']:.4f}"
           if "energy_skill" in scores else ""))
    return result


def evaluate_plan(plan_dir: str | os.PathLike, force: bool = False, max_blocks: Optional[int] = None) -> int:
    """Score every trained point's newest checkpoint (evaluate_point) on the plan's eval shards, on the
    first `max_blocks` held-out blocks (default: each point's eval.max_blocks); returns how many."""
    plan = json.loads((Path(plan_dir) / "plan.json").read_text())
    if not plan.get("eval"):
        raise SweepError(f"{plan_dir}: the sweep names no eval shards (data.eval)")
    done = 0
    for p in plan["points"]:
        out = Path(p["run_dir"]) / EVAL_FILE
        if out.is_file() and not force:
            step = json.loads(out.read_text()).get("step")
            recs = read_records(Path(p["run_dir"]) / "metrics.jsonl")
            if recs and recs[-1].get("step") == step:
                continue  # already scored at the final step
        if spec_of(p["arch"]).uses_autoencoder and not p.get("ae_path"):
            print(f"{p['name']}: not scored (a CALM point without an autoencoder: set autoencoders.{p['k']} "
                  "or the base config's model.ae_path)")
            continue
        evaluate_point(p, plan["eval"], max_blocks=max_blocks)
        done += 1
    return done


def export_autoencoder(run_dir: str | os.PathLike, release: str | os.PathLike) -> Path:
    """The newest intact checkpoint of an AE training run → a directory `calm-data encode --ae` loads."""
    from calm_pretrain.models import build_model
    from calm_pretrain.train.checkpoint import consolidated_state_dict
    from calm_pretrain.release.autoencoder import save_autoencoder

    state, cfg = consolidated_state_dict(Path(run_dir))
    if not spec_of(cfg).encodes_latents:
        raise SweepError(f"{run_dir}: the checkpoint holds a {cfg.arch} model, not an autoencoder")
    ae = build_model(cfg)
    ae.load_state_dict(state, strict=False)
    missing = set(ae.state_dict()) - set(state)
    if missing - {"decoder.lm_head_weight", "encoder.embed_tokens.weight"}:
        raise SweepError(f"{run_dir}: the checkpoint lacks {sorted(missing)[:5]}")
    return save_autoencoder(ae.eval(), release)
