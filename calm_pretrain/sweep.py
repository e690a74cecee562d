"""Scaling-law sweeps: plan a grid of runs, submit it as Slurm job arrays, collect, fit and plot.

    tools/sweep.py plan configs/sweeps/scaling.yaml --out plans/scaling     # configs, plan.json, submit.sh
    bash plans/scaling/submit.sh                                            # AE → export → encode → train
    tools/sweep.py collect plans/scaling --out results/scaling.csv          # + .parquet, .steps.parquet
    tools/sweep.py fit results/scaling.csv --out results/fit.json
    tools/sweep.py plot results/scaling.csv --fit results/fit.json --out results/plots

A sweep YAML (``configs/sweeps/*.yaml``) extends the ``base`` / ``grid`` / ``overrides`` format of
``configs/sweeps/heads.yaml`` (which stays a valid sweep):

  base          a run config (CALM points; any arch works)
  grid          {dotted key | "size": [values]}: the cartesian product gives the points
  sizes         {size name: {dotted key: value}}: what a "size" grid value sets
  overrides     {dotted key: value} for every point (applied before the size and the grid values)
  baselines     optional: {base, grid, overrides} of Transformer baselines (sizes from `sizes`)
  autoencoders  optional: {K: {config, overrides, release}}: the frozen AE of every K; a missing
                `release` directory adds the stages that make it (AE training, export, encode)
  data          tokens (lm-layout token shards: latents and baselines; "{k}" is replaced by K,
                1 for the baseline), ae_tokens (the AE's
                training shards, "{k}" is replaced by K), eval (held-out token shards for
                BrierLM), latents (latent shards per K, default <runs>/latents-k{k}),
                sample_tokens (tokens per sample: seq_chunks = sample_tokens / K, or sample_tokens
                for the baseline)
  launch        {nodes, gpus_per_node}: the world size the planned token and FLOPs budgets assume
  runs          root of the run directories (default runs/sweeps/<sweep file name>)

FLOPs come from :mod:`calm_pretrain.flops` at the run's context (data.seq_chunks): training FLOPs per
token including the frozen AE's encoder forward per chunk (how the paper's table counts the AE for
CALM), inference FLOPs per token including the AE decoder; the AE's own training is listed with its
stage, not added to the points (the published AE is shared by every CALM size).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from calm_pretrain.config import (AutoencoderConfig, CALMConfig, ConfigError, RunConfig, TransformerConfig,
                                  dump_config, load_config)

REPO = Path(__file__).resolve().parents[1]
SWEEP_KEYS = {"base", "grid", "variants", "sizes", "overrides", "baselines", "autoencoders", "data", "launch", "runs",
              "name"}


class SweepError(ValueError):
    """A problem with a sweep file or a plan; the message names the key or file."""


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _path(value: str, root: Path) -> Path:
    """A path from a sweep file: absolute, else relative to the working directory if it exists
    there, else to the repository root (sweep files name configs as configs/...)."""
    p = Path(value)
    if p.is_absolute():
        return p
    for candidate in (Path.cwd() / p, root / p):
        if candidate.exists():
            return candidate.resolve()
    return (Path.cwd() / p).resolve()


def _fmt(template: Optional[str], **values) -> Optional[str]:
    return None if template is None else str(template).format(**values)


def _label(key: str, value: Any) -> str:
    if key in ("size", "variant"):
        return str(value)
    if key == "model.k":
        return f"k{value}"
    return f"{key.split('.')[-1]}-{value}"


def _overrides(mapping: Optional[dict]) -> list[str]:
    """{dotted: value} → ["dotted=<value as YAML>"] (lists and strings survive the round trip)."""
    out = []
    for key, value in (mapping or {}).items():
        out.append(f"{key}={json.dumps(value)}")  # JSON is YAML: strings, lists and numbers round-trip
    return out


def _points_of(section: dict, sizes: dict, where: str) -> list[tuple[dict, list[str]]]:
    """[(grid values of the point, overrides)] for one {base, grid, overrides} section."""
    grid = section.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{where}.grid: expected a mapping of key → list of values")
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise SweepError(f"{where}.grid.{key}: expected a non-empty list")
    # variants: named override sets, each applied alone to the base (a one-at-a-time study), crossed
    # with the grid; without variants, one unnamed variant with no overrides
    variants = section.get("variants") or {None: {}}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise SweepError(f"{where}.variants: expected a mapping of name → {{dotted key: value}}")
    out = []
    for variant, changes in variants.items():
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            ov = _overrides(section.get("overrides"))
            if "size" in values:
                if values["size"] not in sizes:
                    raise SweepError(f"{where}.grid.size: {values['size']!r} is not in sizes "
                                     f"({', '.join(sizes) or 'none'})")
                ov += _overrides(sizes[values["size"]])
            ov += _overrides({k: v for k, v in values.items() if k != "size"}) + _overrides(changes)
            out.append(({"variant": variant, **values} if variant is not None else values, ov))
    return out


def _flops(cfg: RunConfig, ae: Optional[AutoencoderConfig]) -> tuple[float, float]:
    from calm_pretrain.flops import inference_flops_per_token, training_flops_per_token

    context = cfg.data.seq_chunks
    train = training_flops_per_token(cfg.model, context, ae).total
    try:
        infer = inference_flops_per_token(cfg.model, context, ae).total
    except TypeError:  # the autoencoder has no generation cost of its own
        infer = 0.0
    return train, infer


def _params(cfg: RunConfig) -> int:
    from calm_pretrain.models import count_config_parameters

    return int(count_config_parameters(cfg.model)["total"])


def sample_tokens_of(cfg: RunConfig) -> int:
    m = cfg.model
    return cfg.data.seq_chunks * (m.k if isinstance(m, (CALMConfig, AutoencoderConfig)) else 1)


def _entry(kind: str, name: str, cfg: RunConfig, config_path: Path, index: int, ae: Optional[AutoencoderConfig],
           world_size: int, size: Optional[str], grid: dict, depends: list[str]) -> dict:
    from calm_pretrain.models.heads import evals_per_sample

    m = cfg.model
    per_token, infer = _flops(cfg, ae)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size * sample_tokens_of(cfg)
    tokens = tokens_per_step * cfg.train.max_steps
    k = getattr(m, "k", None) if m.arch != "transformer" else None
    group = "Transformer" if m.arch == "transformer" else (f"AE K={k}" if m.arch == "autoencoder" else f"K={k}")
    head = m.head if isinstance(m, CALMConfig) else None
    return {"name": name, "kind": kind, "arch": m.arch, "k": k, "size": size, "group": group, "grid": grid,
            "index": index, "config": str(config_path), "run_dir": cfg.train.output_dir, "params": _params(cfg),
            "context": cfg.data.seq_chunks, "sample_tokens": sample_tokens_of(cfg),
            "head": head.type if head else None, "evals_per_vector": evals_per_sample(head) if head else None,
            "training_flops_per_token": per_token, "inference_flops_per_token": infer,
            "ae_counted": ae is not None, "tokens_per_step": tokens_per_step, "max_steps": cfg.train.max_steps,
            "tokens": tokens, "training_flops": per_token * tokens, "depends_on": depends}


def _write_config(cfg: RunConfig, path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + dump_config(cfg))


def _latents_ready(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("complete", False)
    except (OSError, ValueError):
        return False


def _ae_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def make_plan(sweep_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> dict:
    """Resolve a sweep file into a plan directory; returns the plan (also written as plan.json)."""
    sweep_path = Path(sweep_path)
    try:
        sweep = yaml.safe_load(sweep_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{sweep_path}: cannot read the sweep ({e})") from None
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{sweep_path}: unknown keys {sorted(unknown)} (known: {sorted(SWEEP_KEYS)})")
    if "base" not in sweep:
        raise SweepError(f"{sweep_path}: `base` (a run config) is required")
    out = Path(out).resolve()
    if (out / "plan.json").exists() and not force:
        raise SweepError(f"{out} already holds a plan (plan.json): pass --force to replace it")
    for old in list((out / "configs").glob("[0-9][0-9][0-9][0-9].yaml")) + \
            list((out / "stages" / "ae" / "configs").glob("[0-9][0-9][0-9][0-9].yaml")):
        old.unlink()  # a smaller re-plan must not leave stale points for the job array
    sweep_name = sweep.get("name") or sweep_path.stem
    runs = _path(sweep.get("runs") or f"runs/sweeps/{sweep_name}", REPO)
    sizes = sweep.get("sizes") or {}
    data = sweep.get("data") or {}
    launch = sweep.get("launch") or {}
    world_size = int(launch.get("nodes", 1)) * int(launch.get("gpus_per_node", 1))
    sample_tokens = data.get("sample_tokens")
    eval_dir = str(_path(data["eval"], REPO)) if data.get("eval") else None

    def tokens_of(k: int) -> Optional[str]:
        return str(_path(_fmt(data["tokens"], k=k), REPO)) if data.get("tokens") else None
    aes = {int(k): v or {} for k, v in (sweep.get("autoencoders") or {}).items()}

    def load(base: str, ov: list[str], where: str) -> RunConfig:
        try:
            return load_config(_path(base, REPO), ov)
        except ConfigError as e:
            raise SweepError(f"{sweep_path} ({where}): {e}") from None

    # ---- autoencoder stages: one per K with a missing release ---------------------------------
    ae_cfgs: dict[int, RunConfig] = {}
    stages: dict[str, list[dict]] = {"ae": [], "export": [], "encode": []}
    ae_release: dict[int, Path] = {}
    latents: dict[int, Path] = {}
    missing_inputs: list[tuple] = []  # (K of the AE stage that needs it, or None; path)
    for k, spec in sorted(aes.items()):
        if "config" not in spec:
            raise SweepError(f"{sweep_path}: autoencoders.{k}.config (the AE training config) is required")
        run_dir = runs / f"ae-k{k}"
        ov = _overrides(spec.get("overrides")) + [f"model.k={k}", f"name={sweep_name}-ae-k{k}",
                                                  f"train.output_dir={json.dumps(str(run_dir))}"]
        if data.get("ae_tokens"):
            ov.append(f"data.train={json.dumps([str(_path(_fmt(data['ae_tokens'], k=k), REPO))])}")
        cfg = load(spec["config"], ov, f"autoencoders.{k}")
        if cfg.model.arch != "autoencoder":
            raise SweepError(f"{sweep_path}: autoencoders.{k}.config is a {cfg.model.arch} config, not an autoencoder")
        ae_cfgs[k] = cfg
        ae_release[k] = _path(spec["release"], REPO) if spec.get("release") else run_dir / "release"
        latents[k] = _path(_fmt(data["latents"], k=k), REPO) if data.get("latents") else runs / f"latents-k{k}"
        if not _ae_ready(ae_release[k]):
            if not cfg.data.train:
                raise SweepError(f"{sweep_path}: the K={k} autoencoder must be trained but has no training shards "
                                 "(data.ae_tokens in the sweep, or data.train in its config)")
            for d in cfg.data.train:
                if not Path(d).exists():
                    missing_inputs.append((k, str(d)))
            stages["ae"].append({"k": k, "cfg": cfg, "release": ae_release[k]})
        if not _latents_ready(latents[k]):
            if tokens_of(k) is None:
                raise SweepError(f"{sweep_path}: latents for K={k} must be encoded but data.tokens is not set")
            if not Path(tokens_of(k)).exists():
                missing_inputs.append((k, tokens_of(k)))
            stages["encode"].append({"k": k, "tokens": tokens_of(k), "ae": ae_release[k], "out": latents[k],
                                     "after_ae": not _ae_ready(ae_release[k])})

    # ---- training points: the CALM grid, then the baselines ------------------------------------
    points: list[dict] = []
    cfgs: list[RunConfig] = []
    sections = [("calm", sweep, "sweep")]
    if sweep.get("baselines"):
        sections.append(("baseline", sweep["baselines"], "baselines"))
    names: set[str] = set()
    for kind, section, where in sections:
        if "base" not in section:
            raise SweepError(f"{sweep_path}: {where}.base is required")
        for values, ov in _points_of(section, sizes, where):
            probe = load(section["base"], ov, where)
            m = probe.model
            extra, depends, ae, ae_path = [], [], None, getattr(m, "ae_path", None)
            if isinstance(m, CALMConfig) and m.k in aes:
                k = m.k
                ae = ae_cfgs[k].model
                ae_path = str(ae_release[k])
                extra += [f"model.latent_dim={ae.latent_dim}", f"data.train={json.dumps([str(latents[k])])}"]
                if any(s["k"] == k for s in stages["encode"]):
                    depends.append(f"encode-k{k}")
            elif isinstance(m, CALMConfig) and m.ae_path:
                from data_pipeline.ae_io import load_autoencoder

                try:
                    ae = load_autoencoder(m.ae_path).config
                except Exception:  # noqa: BLE001 - counted without the AE if it is not there yet
                    ae = None
            if isinstance(m, TransformerConfig) and tokens_of(1) and "data.train" not in (section.get("overrides") or {}):
                extra.append(f"data.train={json.dumps([tokens_of(1)])}")
                if not Path(tokens_of(1)).exists():
                    missing_inputs.append((None, tokens_of(1)))
            if sample_tokens and "data.seq_chunks" not in (section.get("overrides") or {}):
                k = getattr(m, "k", 1) if not isinstance(m, TransformerConfig) else 1
                if int(sample_tokens) % k:
                    raise SweepError(f"{sweep_path}: data.sample_tokens = {sample_tokens} is not a multiple of K = {k}")
                extra.append(f"data.seq_chunks={int(sample_tokens) // k}")
            if eval_dir and (getattr(m, "ae_path", None) or not isinstance(m, CALMConfig)):  # a CALM run
                extra.append(f"data.eval={json.dumps(eval_dir)}")  # scores with its AE; without, the eval stage
            label = "-".join(_label(key, v) for key, v in values.items())
            prefix = m.arch if "size" in values else probe.name  # a size grid: the base's size name would mislead
            name = f"{prefix}-{label}" if label else prefix
            if name in names:
                raise SweepError(f"{sweep_path}: two points are both named {name!r}; vary the grid")
            names.add(name)
            extra += [f"name={name}", f"train.output_dir={json.dumps(str(runs / name))}"]
            cfg = load(section["base"], ov + extra, where)
            size = values.get("size")
            points.append(_entry(kind, name, cfg, out / "configs" / f"{len(points):04d}.yaml", len(points), ae,
                                 world_size, size, values, depends))
            points[-1]["ae_path"] = ae_path
            if values.get("variant") is not None:  # a one-at-a-time study: each variant is its own group
                points[-1]["group"] = points[-1]["variant"] = str(values["variant"])
            cfgs.append(cfg)
    if not points:
        raise SweepError(f"{sweep_path}: the grid is empty")

    # Stages only for the K of some CALM point (an AE listed for a K outside the grid is not trained).
    used = {p["k"] for p in points if p["arch"] == "calm"}
    stages = {name: [st for st in sts if st["k"] in used] for name, sts in stages.items()}
    missing_inputs = [path for k, path in missing_inputs if k is None or k in used]

    # ---- write the plan --------------------------------------------------------------------------
    for p, cfg in zip(points, cfgs):
        _write_config(cfg, Path(p["config"]), f"sweep {sweep_name}, point {p['index']}: {p['name']} "
                      f"(generated by tools/sweep.py plan {sweep_path})")
    ae_points = []
    for i, st in enumerate(stages["ae"]):
        cfg = st["cfg"]
        path = out / "stages" / "ae" / "configs" / f"{i:04d}.yaml"
        _write_config(cfg, path, f"sweep {sweep_name}: autoencoder stage for K={st['k']}")
        e = _entry("ae", cfg.name, cfg, path, i, None, world_size, None, {"model.k": st["k"]}, [])
        e["release"] = str(st["release"])
        ae_points.append(e)
    encode_stages = [{"name": f"encode-k{s['k']}", "k": s["k"], "tokens": s["tokens"], "ae": str(s["ae"]),
                      "output": str(s["out"]), "depends_on": ["export-ae"] if s["after_ae"] else []}
                     for s in stages["encode"]]
    plan = {
        "sweep": str(sweep_path.resolve()), "name": sweep_name, "plan_dir": str(out), "runs": str(runs),
        "world_size": world_size, "launch": {"nodes": int(launch.get("nodes", 1)),
                                             "gpus_per_node": int(launch.get("gpus_per_node", 1))},
        "flops_note": ("training FLOPs per token from calm_pretrain.flops.training_flops_per_token at context = "
                       "data.seq_chunks, CALM including the frozen AE encoder's forward per chunk; training_flops = "
                       "per token × planned tokens (max_steps × micro_batch × grad_accum × world_size × sample tokens)"),
        "points": points,
        "stages": {"ae": ae_points,
                   "export": ([{"name": "export-ae", "runs": [p["run_dir"] for p in ae_points],
                                "releases": [p["release"] for p in ae_points], "depends_on": ["ae"]}]
                              if ae_points else []),
                   "encode": encode_stages},
        "missing_inputs": sorted(set(missing_inputs)),
        "eval": eval_dir,
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    _write_submit(plan, out)
    return plan


def _write_submit(plan: dict, out: Path) -> None:
    q = shlex.quote
    launch = plan["launch"]
    nodes = f"--nodes={launch['nodes']}"
    lines = [
        "#!/bin/bash",
        f"# Submits the sweep {plan['name']} in dependency order (generated by tools/sweep.py plan).",
        "# Run from anywhere: it submits from the repository root, as slurm/*.sbatch expect. Each stage's job",
        "# id feeds --dependency=afterok: of the next; the Slurm knobs of slurm/common.sh (PYTHON, NPROC_PER_NODE,",
        "# CALM_ENV_SETUP, SRUN_ARGS, ...) pass through the environment. Output of every sbatch: logs/submit-*.log.",
        "set -euo pipefail",
        f"PLAN={q(str(out))}",
        f"cd {q(str(REPO))}",
        'mkdir -p "$PLAN/logs"',
        "",
        "# submit NAME SBATCH_ARGS...: sbatch --parsable; the job id in JOB (real sbatch prints ID[;CLUSTER],",
        "# a stand-in may print 'Submitted batch job ID' with the job's own output).",
        "submit() {",
        "  local name=$1 out",
        "  shift",
        '  echo "submitting ${name}: sbatch $*"',
        '  out=$(sbatch --parsable "$@" 2>&1 | tee -a "$PLAN/logs/submit-${name}.log") ||',
        '    { echo "sbatch failed for ${name} (see $PLAN/logs/submit-${name}.log)" >&2; exit 1; }',
        "  JOB=$(printf '%s\\n' \"$out\" | sed -n -E 's/^Submitted batch job ([0-9]+).*/\\1/p; s/^([0-9]+)(;.*)?$/\\1/p' | head -n 1)",
        '  [[ -n $JOB ]] || { echo "no job id in the output of sbatch for ${name}" >&2; exit 1; }',
        '  echo "  ${name}: job ${JOB}"',
        "}",
        "",
    ]
    ae, export, encode = plan["stages"]["ae"], plan["stages"]["export"], plan["stages"]["encode"]
    if ae:
        lines += [f"# 1. autoencoders: {', '.join(p['name'] for p in ae)} (one array task each)",
                  f"submit ae --array=0-{len(ae) - 1} --job-name=calm-sweep-ae {nodes} "
                  f'--output="$PLAN/logs/ae-%A_%a.out" slurm/sweep.sbatch "$PLAN/stages/ae"',
                  "AE_JOB=$JOB",
                  "# 2. export the trained autoencoders into release directories (calm-data encode reads them)",
                  'submit export-ae --dependency=afterok:"$AE_JOB" --job-name=calm-sweep-export '
                  '--output="$PLAN/logs/export-%j.out" "$PLAN/stages/export_ae.sbatch"',
                  "EXPORT_JOB=$JOB", ""]
        _write_export_script(export[0], out)
    encode_vars = []
    for st in encode:
        dep = ' --dependency=afterok:"$EXPORT_JOB"' if st["depends_on"] else ""
        var = f"ENCODE_K{st['k']}"
        lines += [f"# encode the token shards with the K={st['k']} autoencoder",
                  f"submit {st['name']}{dep} --job-name=calm-sweep-{st['name']} {nodes} "
                  f"--output=\"$PLAN/logs/{st['name']}-%j.out\" slurm/encode.sbatch {q(st['tokens'])} {q(st['ae'])} "
                  f"{q(st['output'])} --no-progress",
                  f"{var}=$JOB"]
        encode_vars.append((st["name"], var))
    # Training arrays: points with the same dependencies form one contiguous array (or several).
    train_vars = []
    groups: list[tuple[tuple, list[int]]] = []
    for p in plan["points"]:
        deps = tuple(p["depends_on"])
        if groups and groups[-1][0] == deps and groups[-1][1][-1] == p["index"] - 1:
            groups[-1][1].append(p["index"])
        else:
            groups.append((deps, [p["index"]]))
    lines.append("")
    for deps, idx in groups:
        spec = f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])
        dep = ""
        if deps:
            var_of = dict(encode_vars)
            dep = " --dependency=afterok:" + ":".join(f'"${var_of[d]}"' for d in deps)
        names = ", ".join(plan["points"][i]["name"] for i in idx)
        lines += [f"# train: {names}",
                  f"submit train-{spec}{dep} --array={spec} --job-name=calm-sweep-{plan['name']} {nodes} "
                  f'--output="$PLAN/logs/train-%A_%a.out" slurm/sweep.sbatch "$PLAN"',
                  ] + ([f"TRAIN_{len(train_vars)}=$JOB"] if plan.get("eval") else [])
        train_vars.append(f"TRAIN_{len(train_vars)}")
    if plan.get("eval"):
        _write_eval_script(out)
        lines += ["# final BrierLM of every point on the eval shards (one job, after all training arrays)",
                  "submit eval --dependency=afterok:"
                  + ":".join(f'"${v}"' for v in train_vars + (["EXPORT_JOB"] if ae else []))
                  + ' --job-name=calm-sweep-eval --output="$PLAN/logs/eval-%j.out" "$PLAN/stages/eval.sbatch"']
    lines += ["", 'echo "submitted; when the runs finish: python3 tools/sweep.py collect $PLAN --out results.csv"']
    path = out / "submit.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def _write_export_script(stage: dict, out: Path) -> None:
    q = shlex.quote
    pairs = " ".join(f"{q(r)} {q(rel)}" for r, rel in zip(stage["runs"], stage["releases"]))
    _write_stage_script(out, "export_ae", "calm-sweep-export",
                        "Exports the sweep's trained autoencoders (newest checkpoint of each run) into release "
                        "directories\n# that calm-data encode loads",
                        f'"${{PYTHON:-python3}}" -m calm_pretrain.sweep export-ae {pairs}')


ENV_SETUP = ['if [[ -n ${CALM_ENV_SETUP:-} ]]; then  # as slurm/common.sh: module load / conda / venv',
             "  set +u",
             "  # shellcheck source=/dev/null",
             '  source "$CALM_ENV_SETUP"',
             "  set -u",
             "fi"]


def _write_stage_script(out: Path, name: str, job_name: str, comment: str, command: str,
                        sbatch: tuple[str, ...] = ()) -> None:
    """A one-task sbatch script under PLAN/stages/ (generated by tools/sweep.py plan)."""
    text = "\n".join([
        "#!/bin/bash",
        f"# {comment} (generated by tools/sweep.py plan).",
        f"#SBATCH --job-name={job_name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        *sbatch,
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        *ENV_SETUP,
        command,
        ""])
    path = out / "stages" / f"{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _write_eval_script(out: Path) -> None:
    _write_stage_script(out, "eval", "calm-sweep-eval",
                        "Final BrierLM of every point of the sweep (newest checkpoint, the plan's eval shards); "
                        "points\n# already scored are skipped",
                        f'"${{PYTHON:-python3}}" -m calm_pretrain.sweep evaluate {shlex.quote(str(out))}',
                        ("#SBATCH --gpus-per-node=1",))


EVAL_FILE = "sweep_eval.json"
# the scores besides BrierLM that collect() reports per run (final_<name>), with their standard errors
FINAL_SCORES = tuple(f"{name}{se}" for name in ("brier_1", "brier_2", "brier_3", "brier_4", "energy_score",
                                                 "marginal_energy_score", "energy_skill", "token_accuracy")
                     for se in ("", "_se"))


def evaluate_point(point: dict, eval_dir: str, log=print, max_blocks: Optional[int] = None) -> dict:
    """BrierLM of a point's newest checkpoint on `eval_dir` (a CALM also gets its energy skill and score,
    calm_pretrain.eval.skill), written to <run_dir>/sweep_eval.json.

    The same evaluation as the trainer's periodic one (calm_pretrain.train.run.build_evaluator), run
    after training. CALM training configs carry no model.ae_path (training on pre-encoded latents does
    not need the autoencoder), so CALM is scored here, with the AE of its K."""
    import torch

    from calm_pretrain.config import config_from_dict
    from calm_pretrain.train.checkpoint import read_trainer_state, resolve_checkpoint, trained_model
    from calm_pretrain.train.run import build_evaluator, load_frozen_autoencoder

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
    (run_dir / EVAL_FILE).write_text(json.dumps(result, indent=1) + "\n")
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
            recs = _records(Path(p["run_dir"]) / "metrics.jsonl")
            if recs and recs[-1].get("step") == step:
                continue  # already scored at the final step
        if p["arch"] == "calm" and not p.get("ae_path"):
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
    from data_pipeline.ae_io import save_autoencoder

    state, cfg = consolidated_state_dict(Path(run_dir))
    if not isinstance(cfg, AutoencoderConfig):
        raise SweepError(f"{run_dir}: the checkpoint holds a {cfg.arch} model, not an autoencoder")
    ae = build_model(cfg)
    ae.load_state_dict(state, strict=False)
    missing = set(ae.state_dict()) - set(state)
    if missing - {"decoder.lm_head_weight", "encoder.embed_tokens.weight"}:
        raise SweepError(f"{run_dir}: the checkpoint lacks {sorted(missing)[:5]}")
    return save_autoencoder(ae.eval(), release)


# --------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------
def _records(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def collect(plan_dir: str | os.PathLike):
    """(runs table: one row per training point, steps table: one row per logged record) as DataFrames.

    The final scores are the eval stage's (sweep_eval.json) or the last evaluation during training:
    BrierLM, Brier-1 and, for CALM, the held-out energy score. seconds_per_step is the mean logged
    step time, train_seconds = seconds_per_step × steps (the exact training-loop time when every step
    is logged, train.log_every = 1)."""
    import pandas as pd

    plan_dir = Path(plan_dir)
    try:
        plan = json.loads((plan_dir / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"{plan_dir}: no readable plan.json ({e})") from None
    rows, steps = [], []
    for p in plan["points"]:
        recs = _records(Path(p["run_dir"]) / "metrics.jsonl")
        last = recs[-1] if recs else {}
        evals = [r for r in recs if "eval/brierlm" in r]
        scored = Path(p["run_dir"]) / EVAL_FILE
        if scored.is_file():  # the eval stage: the newest checkpoint's score
            final = json.loads(scored.read_text())
            evals.append({"step": final["step"], "eval/brierlm": final.get("brierlm", math.nan),
                          **{f"eval/{k}": final[k] for k in FINAL_SCORES if k in final}})
        tokens_per_step = last.get("tokens", p["tokens_per_step"])
        step = int(last.get("step", 0))
        tokens = step * tokens_per_step
        times = [r["step_time"] for r in recs if "step_time" in r]
        per_step = sum(times) / len(times) if times else math.nan
        rows.append({
            "name": p["name"], "group": p["group"], "arch": p["arch"], "k": p["k"], "size": p["size"],
            "variant": p.get("variant"), "head": p.get("head"), "evals_per_vector": p.get("evals_per_vector"),
            "params": p["params"], "context": p["context"],
            "training_flops_per_token": p["training_flops_per_token"],
            "inference_flops_per_token": p["inference_flops_per_token"],
            "steps": step, "max_steps": p["max_steps"], "tokens": tokens,
            "training_flops": p["training_flops_per_token"] * tokens, "planned_training_flops": p["training_flops"],
            "final_loss": last.get("loss", math.nan),
            "final_brierlm": evals[-1]["eval/brierlm"] if evals else math.nan,
            "brierlm_step": evals[-1]["step"] if evals else None,
            **{f"final_{k}": evals[-1].get(f"eval/{k}", math.nan) if evals else math.nan for k in FINAL_SCORES},
            "seconds_per_step": per_step, "train_seconds": per_step * step,
            "status": "missing" if not recs else ("complete" if step >= p["max_steps"] else "partial"),
            "run_dir": p["run_dir"]})
        for r in recs:
            row = {"name": p["name"], "group": p["group"], "arch": p["arch"], "k": p["k"], "size": p["size"],
                   "step": int(r["step"]), "tokens": int(r["step"]) * r.get("tokens", tokens_per_step)}
            row["training_flops"] = p["training_flops_per_token"] * row["tokens"]
            for key in ("loss", "lr", "grad_norm", "ce", "kl", "accuracy", "tokens_per_s", "step_time"):
                if key in r:
                    row[key] = r[key]
            for key, v in r.items():
                if key.startswith("eval/"):
                    row[key.replace("/", "_")] = v
            steps.append(row)
    runs = pd.DataFrame(rows)
    runs["k"] = runs["k"].astype("Int64")
    steps_df = pd.DataFrame(steps)
    if len(steps_df):
        steps_df["k"] = steps_df["k"].astype("Int64")
    return runs, steps_df


def write_tables(runs, steps, out: str | os.PathLike) -> dict:
    """out = X.csv or X.parquet: writes X.csv and X.parquet (runs) and X.steps.parquet (per step)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".csv", ".parquet") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": base.with_suffix(".csv"), "parquet": base.with_suffix(".parquet"),
             "steps": base.parent / (base.name + ".steps.parquet")}
    runs.to_csv(paths["csv"], index=False)
    runs.to_parquet(paths["parquet"], index=False)
    steps.to_parquet(paths["steps"], index=False)
    return paths


def read_tables(results: str | os.PathLike):
    import pandas as pd

    results = Path(results)
    base = results.with_suffix("") if results.suffix in (".csv", ".parquet") else results
    runs = pd.read_parquet(results) if results.suffix == ".parquet" else pd.read_csv(results)
    steps_path = base.parent / (base.name + ".steps.parquet")
    steps = pd.read_parquet(steps_path) if steps_path.is_file() else pd.DataFrame()
    return runs, steps


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------
FIT_FORMS = {
    # BrierLM is a bounded score (0–100) that grows roughly linearly in log-compute over the range a
    # sweep covers: least squares of BrierLM on log10(C).
    "loglinear": "brierlm = a + b * log10(training_flops)",
    # A power law in compute, fitted as a line in log-log space (positive BrierLM only).
    "power": "brierlm = 10**a * training_flops**b  (least squares of log10 brierlm on log10 C)",
}


def _least_squares(x: list[float], y: list[float]) -> dict:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return {"a": a, "b": b, "r2": (1.0 - ss_res / ss_tot) if ss_tot > 0 else None, "n": n}


def fit(runs, steps=None, form: str = "loglinear", metric: str = "brierlm") -> dict:
    """Per group (K=1, K=2, ..., Transformer, or a study's variants): `metric` against training FLOPs.

    `metric` is brierlm or any score the evaluation logs (energy_skill, brier_1, ...). The points are
    each run's final (training FLOPs, metric): a group's runs of different sizes. A group with fewer
    than two distinct FLOPs values (one size only) is fitted on its runs' evaluation history instead
    (the metric at every evaluated step against the FLOPs spent up to that step), and says so in
    ``points_from``. With the loglinear form, ``crosses_zero_at`` is the FLOPs where the fitted line
    reaches 0 (the budget at which a score below zero is projected to turn positive)."""
    if form not in FIT_FORMS:
        raise SweepError(f"unknown fit form {form!r}; known: {sorted(FIT_FORMS)}")
    final, history = f"final_{metric}", f"eval_{metric}"
    if final not in runs:
        raise SweepError(f"no column {final} in the results: is {metric!r} a score the evaluation logs?")
    out = {"form": form, "metric": metric, "formula": FIT_FORMS[form].replace("brierlm", metric), "groups": {}}
    for group, g in runs.groupby("group", sort=False):
        g = g[g[final].notna() & (g["training_flops"] > 0)]
        pts = [(float(c), float(v)) for c, v in zip(g["training_flops"], g[final])]
        source = "final"
        if len({c for c, _ in pts}) < 2 and steps is not None and len(steps) and history in steps:
            h = steps[(steps["group"] == group) & steps[history].notna() & (steps["training_flops"] > 0)]
            pts = [(float(c), float(v)) for c, v in zip(h["training_flops"], h[history])]
            source = "eval history"
        if form == "power":
            pts = [(c, v) for c, v in pts if v > 0]
        entry: dict[str, Any] = {"points_from": source, "points": [[c, v] for c, v in pts]}
        if len({c for c, _ in pts}) < 2:
            entry.update(a=None, b=None, r2=None, n=len(pts), note="fewer than two distinct FLOPs values: no fit")
        else:
            xs = [math.log10(c) for c, _ in pts]
            ys = [v if form == "loglinear" else math.log10(v) for _, v in pts]
            entry.update(_least_squares(xs, ys))
            entry["flops_range"] = [min(c for c, _ in pts), max(c for c, _ in pts)]
            if form == "loglinear" and entry["b"]:
                entry["crosses_zero_at"] = 10 ** (-entry["a"] / entry["b"])
        out["groups"][str(group)] = entry
    return out


def predict(entry: dict, form: str, flops: float) -> float:
    x = math.log10(flops)
    return entry["a"] + entry["b"] * x if form == "loglinear" else 10 ** (entry["a"] + entry["b"] * x)


# --------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------
def _group_order(groups) -> list[str]:
    def key(g: str):
        return (1, 0) if g == "Transformer" else (0, int(g.split("=")[1]) if "=" in g else 0)
    return sorted(set(groups), key=key)


def plot(runs, steps, fit_result: Optional[dict], out_dir: str | os.PathLike) -> list[Path]:
    """brierlm_vs_flops.png (final points, fitted lines, one colour per K, the Transformer dashed) and
    loss_curves.png (training loss against tokens: CALM's energy loss and the baseline's cross-entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _group_order(runs["group"])
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(groups)}
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g in groups:
        style = "--" if g == "Transformer" else "-"
        d = runs[(runs["group"] == g) & runs["final_brierlm"].notna() & (runs["training_flops"] > 0)]
        label = "Transformer" if g == "Transformer" else f"CALM {g}"
        ax.scatter(d["training_flops"], d["final_brierlm"], color=colours[g], marker="s" if g == "Transformer" else "o",
                   zorder=3, label=label)
        for _, r in d.iterrows():
            if isinstance(r["size"], str):
                ax.annotate(r["size"], (r["training_flops"], r["final_brierlm"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        entry = (fit_result or {}).get("groups", {}).get(g)
        if entry and entry.get("b") is not None:
            lo, hi = entry["flops_range"]
            xs = [lo * (hi / lo) ** (i / 49) for i in range(50)]
            ax.plot(xs, [predict(entry, fit_result["form"], x) for x in xs], style, color=colours[g],
                    label=f"fit {g}: slope {entry['b']:.2f}" + (" (eval history)" if entry["points_from"] != "final" else ""))
            if entry["points_from"] != "final":
                ax.scatter([c for c, _ in entry["points"]], [v for _, v in entry["points"]], color=colours[g],
                           marker=".", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (incl. AE encoder share)")
    ax.set_ylabel("BrierLM")
    ax.set_title("BrierLM vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save_figure(fig, out_dir / "brierlm_vs_flops.png"))

    if steps is not None and len(steps) and "loss" in steps:
        archs = [a for a in ("calm", "transformer") if (steps["arch"] == a).any()]
        fig, axes = plt.subplots(1, max(1, len(archs)), figsize=(6.0 * max(1, len(archs)), 4.2), squeeze=False)
        sizes = list(dict.fromkeys(str(x) for x in runs["size"]))  # sweep order: small to large
        styles = [":", "--", "-.", "-"][-len(sizes):] if len(sizes) <= 4 else ["-"] * len(sizes)
        for ax, arch in zip(axes[0], archs):
            for name, d in steps[steps["arch"] == arch].groupby("name", sort=False):
                g = d["group"].iloc[0]
                style = styles[sizes.index(str(d["size"].iloc[0]))] if str(d["size"].iloc[0]) in sizes else "-"
                ax.plot(d["tokens"], d["loss"], style, color=colours.get(g, "k"), label=name, alpha=0.85)
            ax.set_xlabel("training tokens")
            heads = set(runs["head"].dropna()) if "head" in runs else set()
            ax.set_ylabel("cross-entropy" if arch != "calm" else
                          "energy loss" if heads <= {"energy"} else "head loss (each head its own: not comparable)")
            ax.set_title("CALM" if arch == "calm" else "Transformer baseline")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        written.append(_save_figure(fig, out_dir / "loss_curves.png"))
    if "head" in runs and runs["head"].dropna().nunique() > 1:
        written.append(plot_heads(runs, out_dir / "heads.png"))
    if "variant" in runs and runs["variant"].notna().any() and steps is not None and len(steps):
        written.append(plot_study(runs, steps, out_dir / "study.png"))
    return written


STUDY_PANELS = [("energy_skill", "energy skill (> 0: uses its context)")] + \
    [(f"brier_{n}", f"Brier-{n}") for n in range(1, 5)] + [("token_accuracy", "decoded-token accuracy, 1 sample")]


def plot_study(runs, steps, path: str | os.PathLike) -> Path:
    """A one-at-a-time study: each variant's held-out scores (± one standard error) against the training
    FLOPs spent, from the evaluations during training; the Transformer's Brier-n dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    names = list(dict.fromkeys(runs["name"]))
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    for ax, (metric, title) in zip(axes.flat, STUDY_PANELS):
        col = f"eval_{metric}"
        if col not in steps:
            continue
        for name, d in steps[steps[col].notna()].groupby("name", sort=False):
            transformer = d["arch"].iloc[0] == "transformer"
            se = d[f"{col}_se"] if f"{col}_se" in d else None
            label = "Transformer" if transformer else str(runs.loc[runs["name"] == name, "variant"].iloc[0])
            ax.errorbar(d["training_flops"], d[col], yerr=se, fmt="--s" if transformer else "-o", ms=3, capsize=2,
                        color="k" if transformer else colours[name], label=label, alpha=0.85)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    return _save_figure(fig, path, dpi=110)


HEAD_PANELS = [  # (column, title, log scale): a training loss is not comparable across heads, so none here
    ("final_brierlm", "BrierLM (higher is better)", False),
    ("final_brier_1", "Brier-1 (higher is better)", False),
    ("final_energy_score", "held-out energy score (lower is better)", False),
    ("evals_per_vector", "network evaluations per vector", True),
    ("training_flops_per_token", "training FLOPs / token", False),
    ("inference_flops_per_token", "generation FLOPs / token", True),
    ("train_seconds", "training seconds", False),
    ("params", "parameters", False),
]


def _short(v: float) -> str:
    return f"{v / 1e6:.3g}M" if abs(v) >= 1e5 else f"{v:.4g}"


def plot_heads(runs, path: str | os.PathLike) -> Path:
    """One bar per head type in each of HEAD_PANELS (a sweep over model.head.type, one run per head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = runs[runs["head"].notna()]
    names = d["head"].tolist()
    colours = [plt.get_cmap("tab10")(i) for i in range(len(names))]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.6))
    for ax, (column, title, log) in zip(axes.flat, HEAD_PANELS):
        values = [float(v) for v in d[column]] if column in d else [math.nan] * len(names)
        ax.bar(names, [0.0 if math.isnan(v) else v for v in values], color=colours)
        for i, v in enumerate(values):
            if not math.isnan(v):
                ax.annotate(_short(v), (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7,
                            xytext=(0, 2 if v >= 0 else -2), textcoords="offset points")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save_figure(fig, path, dpi=100)


def _save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Command line (tools/sweep.py)
# --------------------------------------------------------------------------------------------
def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plan", help="resolve a sweep YAML into a plan directory (configs, plan.json, submit.sh)")
    s.add_argument("sweep")
    s.add_argument("--out", required=True, help="plan directory")
    s.add_argument("--force", action="store_true", help="replace an existing plan there")
    s = sub.add_parser("collect", help="every run's metrics.jsonl into one table")
    s.add_argument("plan_dir")
    s.add_argument("--out", required=True, help="results.csv or results.parquet (both written, + .steps.parquet)")
    s = sub.add_parser("fit", help="fit BrierLM against training FLOPs per K")
    s.add_argument("results", help="the table from collect (.csv or .parquet)")
    s.add_argument("--out", required=True, help="fit.json")
    s.add_argument("--form", choices=sorted(FIT_FORMS), default="loglinear")
    s.add_argument("--metric", default="brierlm", help="the score to fit: brierlm, energy_skill, brier_1, ...")
    s = sub.add_parser("plot", help="PNG figures: BrierLM vs training FLOPs, loss curves (and heads.png for a "
                                    "sweep over model.head.type)")
    s.add_argument("results")
    s.add_argument("--fit", help="fit.json (draws the fitted lines)")
    s.add_argument("--out", required=True, help="output directory")
    s = sub.add_parser("evaluate", help="final BrierLM of every point (the plan's eval stage)")
    s.add_argument("plan_dir")
    s.add_argument("--force", action="store_true", help="score points already scored again")
    s.add_argument("--max-blocks", type=int, help="held-out blocks to score (default: each point's eval.max_blocks)")
    s = sub.add_parser("export-ae", help="AE training runs → release directories for calm-data encode")
    s.add_argument("pairs", nargs="+", metavar="RUN_DIR RELEASE_DIR")
    args = p.parse_args(argv)
    try:
        if args.command == "plan":
            plan = make_plan(args.sweep, args.out, force=args.force)
            print(f"{plan['plan_dir']}: {len(plan['points'])} points, {len(plan['stages']['ae'])} autoencoder "
                  f"stages, {len(plan['stages']['encode'])} encode stages; submit with bash {plan['plan_dir']}/submit.sh")
            for q in plan["stages"]["ae"] + plan["points"]:
                print(f"  {q['kind']:<8} {q['name']:<32} {q['params'] / 1e6:9.2f}M params "
                      f"{_fmt_flops(q['training_flops_per_token'])} FLOPs/token {_fmt_flops(q['training_flops'])} FLOPs"
                      + (f"  after {', '.join(q['depends_on'])}" if q["depends_on"] else ""))
            for m in plan["missing_inputs"]:
                print(f"  warning: input {m} does not exist yet (make it before the jobs start)")
        elif args.command == "collect":
            runs, steps = collect(args.plan_dir)
            paths = write_tables(runs, steps, args.out)
            print(runs[["name", "group", "steps", "tokens", "training_flops", "final_loss", "final_brierlm",
                        "status"]].to_string(index=False))
            if runs["head"].dropna().nunique() > 1:  # a head comparison: the columns that compare heads
                print(runs[["head", "evals_per_vector", "final_brierlm", "final_brier_1", "final_energy_score",
                            "training_flops_per_token", "inference_flops_per_token", "train_seconds"]]
                      .to_string(index=False))
            print("wrote " + ", ".join(str(v) for v in paths.values()))
        elif args.command == "fit":
            runs, steps = read_tables(args.results)
            result = fit(runs, steps, args.form, args.metric)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(result["formula"])
            for g, e in result["groups"].items():
                if e["b"] is None:
                    print(f"  {g:<12} {e['note']} ({e['n']} points)")
                else:
                    r2 = "n/a" if e["r2"] is None else f"{e['r2']:.3f}"
                    zero = f" crosses 0 at {e['crosses_zero_at']:.3g} FLOPs" if e.get("crosses_zero_at") else ""
                    print(f"  {g:<12} a={e['a']:.4g} b={e['b']:.4g} r2={r2} n={e['n']} ({e['points_from']}){zero}")
        elif args.command == "plot":
            runs, steps = read_tables(args.results)
            fit_result = json.loads(Path(args.fit).read_text()) if args.fit else None
            for path in plot(runs, steps, fit_result, args.out):
                print(f"wrote {path}")
        elif args.command == "evaluate":
            print(f"scored {evaluate_plan(args.plan_dir, args.force, args.max_blocks)} points")
        elif args.command == "export-ae":
            if len(args.pairs) % 2:
                raise SweepError("export-ae takes pairs: RUN_DIR RELEASE_DIR [RUN_DIR RELEASE_DIR ...]")
            for run, rel in zip(args.pairs[::2], args.pairs[1::2]):
                print(f"exported {run} → {export_autoencoder(run, rel)}")
    except (SweepError, ConfigError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
