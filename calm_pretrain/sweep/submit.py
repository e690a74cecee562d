"""A plan's Slurm scripts: submit.sh (every stage in dependency order) and the one-task stage scripts
under PLAN/stages/, from the templates in slurm/templates/.

The templates live next to the slurm/*.sbatch scripts they submit: the generated submit.sh runs those
from the repository root, so a plan is always made from (and for) a checkout of the repository.
"""
from __future__ import annotations

import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm" / "templates"


def render(template: str, **values: str | list[str]) -> str:
    """The template file with each @KEY@ replaced: a string in place, a list of lines for a line that is
    only @KEY@ (no lines: the line goes)."""
    out = []
    for line in (TEMPLATES / template).read_text().splitlines():
        key = line[1:-1] if line.startswith("@") and line.endswith("@") else None
        if key in values and isinstance(values[key], list):
            out += values[key]
            continue
        for name, value in values.items():
            if isinstance(value, str):
                line = line.replace(f"@{name}@", value)
        out.append(line)
    return "\n".join(out) + "\n"


def _write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def write_submit(plan: dict, out: Path) -> None:
    """PLAN/submit.sh, and the stage scripts it submits (export, eval) where the plan has those stages."""
    nodes = f"--nodes={plan['launch']['nodes']}"
    ae, export, encode = plan["stages"]["ae"], plan["stages"]["export"], plan["stages"]["encode"]
    lines: list[str] = []
    if ae:
        lines += _autoencoder_lines(ae, nodes)
        write_export_script(export[0], out)
    encode_vars = []
    for st in encode:
        lines += _encode_lines(st, nodes)
        encode_vars.append((st["name"], f"ENCODE_K{st['k']}"))
    lines.append("")
    train_vars = _train_lines(plan, nodes, dict(encode_vars), lines)
    if plan.get("eval"):
        write_eval_script(out)
        lines += ["# final BrierLM of every point on the eval shards (one job, after all training arrays)",
                  "submit eval --dependency=afterok:"
                  + ":".join(f'"${v}"' for v in train_vars + (["EXPORT_JOB"] if ae else []))
                  + ' --job-name=calm-sweep-eval --output="$PLAN/logs/eval-%j.out" "$PLAN/stages/eval.sbatch"']
    q = shlex.quote
    _write_executable(out / "submit.sh", render("submit.sh", NAME=plan["name"], PLAN=q(str(out)), REPO=q(str(REPO)),
                                                STAGES=lines))


def _autoencoder_lines(ae: list[dict], nodes: str) -> list[str]:
    return [f"# 1. autoencoders: {', '.join(p['name'] for p in ae)} (one array task each)",
            f"submit ae --array=0-{len(ae) - 1} --job-name=calm-sweep-ae {nodes} "
            f'--output="$PLAN/logs/ae-%A_%a.out" slurm/sweep.sbatch "$PLAN/stages/ae"',
            "AE_JOB=$JOB",
            "# 2. export the trained autoencoders into release directories (calm-data encode reads them)",
            'submit export-ae --dependency=afterok:"$AE_JOB" --job-name=calm-sweep-export '
            '--output="$PLAN/logs/export-%j.out" "$PLAN/stages/export_ae.sbatch"',
            "EXPORT_JOB=$JOB", ""]


def _encode_lines(st: dict, nodes: str) -> list[str]:
    q = shlex.quote
    dep = ' --dependency=afterok:"$EXPORT_JOB"' if st["depends_on"] else ""
    return [f"# encode the token shards with the K={st['k']} autoencoder",
            f"submit {st['name']}{dep} --job-name=calm-sweep-{st['name']} {nodes} "
            f"--output=\"$PLAN/logs/{st['name']}-%j.out\" slurm/encode.sbatch {q(st['tokens'])} {q(st['ae'])} "
            f"{q(st['output'])} --no-progress",
            f"ENCODE_K{st['k']}=$JOB"]


def _train_lines(plan: dict, nodes: str, var_of: dict[str, str], lines: list[str]) -> list[str]:
    """Appends the training arrays' lines: points with the same dependencies form one contiguous array
    (or several). Returns the shell variables of their job ids (set only when an eval job waits on them)."""
    train_vars: list[str] = []
    groups: list[tuple[tuple, list[int]]] = []
    for p in plan["points"]:
        deps = tuple(p["depends_on"])
        if groups and groups[-1][0] == deps and groups[-1][1][-1] == p["index"] - 1:
            groups[-1][1].append(p["index"])
        else:
            groups.append((deps, [p["index"]]))
    for deps, idx in groups:
        spec = f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])
        dep = " --dependency=afterok:" + ":".join(f'"${var_of[d]}"' for d in deps) if deps else ""
        names = ", ".join(plan["points"][i]["name"] for i in idx)
        lines += [f"# train: {names}",
                  f"submit train-{spec}{dep} --array={spec} --job-name=calm-sweep-{plan['name']} {nodes} "
                  f'--output="$PLAN/logs/train-%A_%a.out" slurm/sweep.sbatch "$PLAN"',
                  ] + ([f"TRAIN_{len(train_vars)}=$JOB"] if plan.get("eval") else [])
        train_vars.append(f"TRAIN_{len(train_vars)}")
    return train_vars


def write_stage_script(out: Path, name: str, job_name: str, comment: str, command: str,
                       sbatch: tuple[str, ...] = ()) -> None:
    """A one-task sbatch script PLAN/stages/<name>.sbatch (slurm/templates/stage.sbatch)."""
    _write_executable(out / "stages" / f"{name}.sbatch",
                      render("stage.sbatch", COMMENT=comment, JOB_NAME=job_name, SBATCH=list(sbatch), COMMAND=command))


def write_export_script(stage: dict, out: Path) -> None:
    q = shlex.quote
    pairs = " ".join(f"{q(r)} {q(rel)}" for r, rel in zip(stage["runs"], stage["releases"]))
    write_stage_script(out, "export_ae", "calm-sweep-export",
                       "Exports the sweep's trained autoencoders (newest checkpoint of each run) into release "
                       "directories\n# that calm-data encode loads",
                       f'"${{PYTHON:-python3}}" -m calm_pretrain.sweep export-ae {pairs}')


def write_eval_script(out: Path) -> None:
    write_stage_script(out, "eval", "calm-sweep-eval",
                       "Final BrierLM of every point of the sweep (newest checkpoint, the plan's eval shards); "
                       "points\n# already scored are skipped",
                       f'"${{PYTHON:-python3}}" -m calm_pretrain.sweep evaluate {shlex.quote(str(out))}',
                       ("#SBATCH --gpus-per-node=1",))
