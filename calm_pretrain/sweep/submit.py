"""A plan's stages as a workflow graph (calm_pretrain/workflow), and its Slurm scripts: submit.sh (every
stage in dependency order) and the one-task stage scripts under PLAN/stages/, written by the Slurm
runner from the templates in slurm/templates/.

AE → export → encode per K → training arrays → eval. Each stage holds the commands a user would run
for it (`calm-pretrain train --config` for each point of an array); under Slurm the training arrays
and the encode jobs go through slurm/sweep.sbatch and slurm/encode.sbatch, which add srun over every
GPU and the requeue on a signal.
"""
from __future__ import annotations

from pathlib import Path

from calm_pretrain.workflow import Command, Graph, SlurmJob, SlurmRunner, Stage

REPO = Path(__file__).resolve().parents[2]


def write_submit(plan: dict, out: Path) -> Path:
    """PLAN/submit.sh, and the stage scripts it submits (export, eval) where the plan has those stages."""
    runner = SlurmRunner(out, f"the sweep {plan['name']}", "tools/sweep.py plan",
                         next_step="when the runs finish: python3 tools/sweep.py collect $PLAN --out results.csv")
    return runner.write(plan_graph(plan, out))


def _train(config: str) -> Command:
    return Command(("calm_pretrain.cli", "train", "--config", config))


def plan_graph(plan: dict, out: Path) -> Graph:
    """The plan's stages in the order they are submitted."""
    nodes = f"--nodes={plan['launch']['nodes']}"
    ae, export, encode = plan["stages"]["ae"], plan["stages"]["export"], plan["stages"]["encode"]
    stages: list[Stage] = []
    if ae:
        stages.append(Stage(
            "ae", commands=[_train(p["config"]) for p in ae], outputs=[p["run_dir"] for p in ae],
            slurm=SlurmJob("slurm/sweep.sbatch", (str(out / "stages" / "ae"),), (f"--array=0-{len(ae) - 1}", nodes),
                           job_name="calm-sweep-ae"),
            about=f"autoencoders: {', '.join(p['name'] for p in ae)} (one array task each)"))
        st = export[0]
        pairs = [x for pair in zip(st["runs"], st["releases"]) for x in pair]
        stages.append(Stage(
            st["name"], commands=[Command(("calm_pretrain.sweep", "export-ae", *pairs))], needs=("ae",),
            outputs=st["releases"], slurm=SlurmJob(job_name="calm-sweep-export"),
            about="export the trained autoencoders (newest checkpoint of each run) into release directories\n"
                  "that calm-data encode loads"))
    for st in encode:
        stages.append(Stage(
            st["name"], commands=[Command(("data_pipeline.cli", "encode", st["tokens"], "--ae", st["ae"], "-o",
                                           st["output"], "--no-progress"))],
            needs=st["depends_on"], inputs=[st["tokens"]] + ([] if st["depends_on"] else [st["ae"]]),
            outputs=[st["output"]],
            slurm=SlurmJob("slurm/encode.sbatch", (st["tokens"], st["ae"], st["output"], "--no-progress"), (nodes,),
                           job_name=f"calm-sweep-{st['name']}"),
            about=f"encode the token shards with the K={st['k']} autoencoder"))
    trains = _train_stages(plan, out, nodes)
    stages += trains
    if plan.get("eval"):
        stages.append(Stage(
            "eval", commands=[Command(("calm_pretrain.sweep", "evaluate", str(out)))],
            needs=[t.name for t in trains] + (["export-ae"] if ae else []), inputs=[plan["eval"]],
            slurm=SlurmJob(directives=("--gpus-per-node=1",), job_name="calm-sweep-eval"),
            about="Final BrierLM of every point of the sweep (newest checkpoint, the plan's eval shards), one job\n"
                  "after all training arrays; points already scored are skipped"))
    return Graph(stages)


def _train_stages(plan: dict, out: Path, nodes: str) -> list[Stage]:
    """The training arrays: points with the same dependencies form one contiguous array (or several)."""
    groups: list[tuple[tuple, list[int]]] = []
    for p in plan["points"]:
        deps = tuple(p["depends_on"])
        if groups and groups[-1][0] == deps and groups[-1][1][-1] == p["index"] - 1:
            groups[-1][1].append(p["index"])
        else:
            groups.append((deps, [p["index"]]))
    stages = []
    for deps, idx in groups:
        spec = f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])
        points = [plan["points"][i] for i in idx]
        stages.append(Stage(
            f"train-{spec}", commands=[_train(p["config"]) for p in points], needs=deps,
            outputs=[p["run_dir"] for p in points],
            slurm=SlurmJob("slurm/sweep.sbatch", (str(out),), (f"--array={spec}", nodes),
                           job_name=f"calm-sweep-{plan['name']}"),
            about=f"train: {', '.join(p['name'] for p in points)}"))
    return stages
