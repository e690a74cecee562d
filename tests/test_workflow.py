"""calm_pretrain/workflow: the stage graph's checks, the local runner (real subprocesses behind done
markers: reuse, a changed setting refused, a cut-off stage redone) and the Slurm runner (the scripts it
writes, submitted by its submit.sh to a fake sbatch that prints job ids)."""
import hashlib
import json
import os
import subprocess

import pytest

from calm_pretrain.workflow import (Command, CommandFailed, Graph, LocalRunner, SettingsChanged, SlurmJob, SlurmRunner,
                                    Stage, WorkflowError, chain_key)
from tests.helpers import REPO, shellcheck

# A tiny command for the local runner: appends its arguments and its thread count to a file.
TINY = '''import os, sys
with open(sys.argv[1], "a") as f:
    f.write(" ".join(sys.argv[2:]) + " threads=" + os.environ.get("OMP_NUM_THREADS", "-") + "\\n")
if "fail" in sys.argv:
    print("tiny: failing as asked")
    sys.exit(3)
'''


def _stage(name, *cmds, needs=(), settings=None, **kw):
    return Stage(name, commands=[Command(c) for c in cmds], needs=needs, settings=settings, **kw)


# ------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------
def test_graph_keeps_the_order_and_the_edges():
    g = Graph([_stage("a", ["m"]), _stage("b", ["m"], needs=("a",)), _stage("c", ["m"], needs=("a", "b"))])
    assert g.names == ["a", "b", "c"] and len(g) == 3 and g["b"].needs == ("a",)
    assert g.needed_by("a") == ["b", "c"] and g.needed_by("c") == []


@pytest.mark.parametrize("stages, message", [
    ([("a", ()), ("a", ())], "two stages are named 'a'"),
    ([("a", ()), ("b", ("a", "nope"))], "stage 'b' needs 'nope', which no stage of the graph is"),
    ([("a", ("c",)), ("b", ("a",)), ("c", ("b",))], "in a cycle: a → c → b → a"),
    ([("a", ("a",))], "in a cycle: a → a"),
    ([("b", ("a",)), ("a", ())], "stage 'b' is listed before 'a', which it needs"),
])
def test_graph_refuses_what_cannot_run_with_one_clear_error(stages, message):
    with pytest.raises(WorkflowError, match=message):
        Graph([_stage(name, ["m"], needs=needs) for name, needs in stages])


def test_a_stage_needs_a_name_fit_for_files_and_something_to_run():
    with pytest.raises(WorkflowError, match="no spaces, quotes or slashes"):
        _stage("a b", ["m"])
    with pytest.raises(WorkflowError, match="nothing to run"):
        Stage("empty")
    with pytest.raises(WorkflowError, match="argv is empty"):
        Command(())


# ------------------------------------------------------------------------------------------------
# The local runner
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny command as module `tiny_stage` (the runner runs `python -m`, from the repository root)."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "tiny_stage.py").write_text(TINY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mod), os.environ.get("PYTHONPATH", "")]))
    return tmp_path / "out.txt"


def _graph(out, first="x", second="y", fail=False):
    lines = lambda: {"lines": len(out.read_text().splitlines()), "metric": "ok"}  # noqa: E731
    return Graph([
        Stage("write", commands=[Command(("tiny_stage", str(out), "first"), threads=3)], outputs=[out],
              settings={"first": first}, result=lines),
        Stage("again", commands=[Command(("tiny_stage", str(out), "second", *(["fail"] if fail else [])))],
              needs=("write",), settings=second, result=lines),
    ])


def test_local_runner_runs_each_stage_once_and_reuses_it(tmp_path, tiny):
    logs = []
    summary = LocalRunner(tmp_path / "run", logs.append).run(_graph(tiny))
    assert tiny.read_text().splitlines() == ["first threads=3", "second threads=" + os.environ.get("OMP_NUM_THREADS", "-")]
    assert [(r["stage"], r["lines"]) for r in summary] == [("write", 1), ("again", 2)]
    markers = {name: json.loads((tmp_path / "run" / f"{name}.done.json").read_text()) for name in ("write", "again")}
    # The key the main job's markers have always held: sha256 of [previous key, name, settings], 16 digits.
    k1 = hashlib.sha256(b'["", "write", {"first": "x"}]').hexdigest()[:16]
    k2 = hashlib.sha256(f'["{k1}", "again", "y"]'.encode()).hexdigest()[:16]
    assert markers["write"]["key"] == k1 == chain_key("", "write", {"first": "x"}) and markers["again"]["key"] == k2
    assert "$ " in (tmp_path / "run" / "logs" / "write.log").read_text()  # the command line, then its output

    again = []
    runner = LocalRunner(tmp_path / "run", again.append)
    reused = runner.run(_graph(tiny))
    assert len(tiny.read_text().splitlines()) == 2  # no command ran
    assert again == ["== write: done before, reusing (ok)", "== again: done before, reusing (ok)"]
    assert [r["lines"] for r in reused] == [1, 2] and runner.result("again")["key"] == markers["again"]["key"]

    (tmp_path / "run" / "again.done.json").unlink()  # a cut-off (or deleted) stage runs again, alone
    LocalRunner(tmp_path / "run", lambda s: None).run(_graph(tiny))
    assert tiny.read_text().splitlines()[1:] == ["second threads=" + os.environ.get("OMP_NUM_THREADS", "-")] * 2


def test_local_runner_refuses_a_finished_stage_made_with_other_settings(tmp_path, tiny):
    LocalRunner(tmp_path / "run", lambda s: None).run(_graph(tiny))
    with pytest.raises(SettingsChanged, match=r"stage 'again' finished with other settings .*\(a knob\); use a new "
                                              r"dir, or delete again\.done\.json"):
        LocalRunner(tmp_path / "run", lambda s: None, cause="a knob", new_dir="a new dir").run(_graph(tiny, second="z"))
    with pytest.raises(SettingsChanged, match="'write'"):
        LocalRunner(tmp_path / "run", lambda s: None).run(_graph(tiny, first="w"))
    assert len(tiny.read_text().splitlines()) == 2
    # A change upstream changes every later key too: with the first stage redone, the second one made
    # after the old first stage is refused, its own settings unchanged.
    (tmp_path / "run" / "write.done.json").unlink()
    with pytest.raises(SettingsChanged, match="'again'"):
        LocalRunner(tmp_path / "run", lambda s: None).run(_graph(tiny, first="w"))
    assert len(tiny.read_text().splitlines()) == 3


def test_a_failed_command_raises_with_its_output_and_leaves_no_marker(tmp_path, tiny):
    with pytest.raises(CommandFailed, match=r"exited with 3 .*\n.*tiny: failing as asked"):
        LocalRunner(tmp_path / "run", lambda s: None).run(_graph(tiny, fail=True))
    assert (tmp_path / "run" / "write.done.json").is_file() and not (tmp_path / "run" / "again.done.json").exists()


def test_concurrent_commands_prepare_and_result_run_in_order(tmp_path, tiny):
    order = []
    stage = Stage("both", commands=[Command(("tiny_stage", str(tiny), f"job{i}"), tmp_path / f"job{i}.log")
                                    for i in range(3)], concurrent=True,
                  prepare=lambda: order.append("prepare"),
                  result=lambda: order.append("result") or {"n": len(tiny.read_text().splitlines())})
    summary = LocalRunner(tmp_path / "run", lambda s: None).run(Graph([stage]))
    assert order == ["prepare", "result"] and summary[0]["n"] == 3
    assert sorted(line.split()[0] for line in tiny.read_text().splitlines()) == ["job0", "job1", "job2"]
    assert all((tmp_path / f"job{i}.log").is_file() for i in range(3))


# ------------------------------------------------------------------------------------------------
# The Slurm runner
# ------------------------------------------------------------------------------------------------
FAKE_SBATCH = '''#!/bin/bash
# A fake sbatch: records its arguments, prints the next job id as `sbatch --parsable` does (ID;CLUSTER).
n=$(( $(cat "$FAKE_DIR/next" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$FAKE_DIR/next"
(IFS='|'; printf '%s\\n' "$n|$*") >> "$FAKE_DIR/calls"  # one call a line, its words apart
echo "$n;cluster"
'''


def _diamond(out):
    """prep → (train array through a repository script, export) → eval: a diamond of four stages."""
    return Graph([
        Stage("prep", commands=[Command(("data_pipeline.cli", "tokenize", "in dir/x.jsonl", "-o", str(out / "tok")),
                                        threads=2)], about="tokenize"),
        Stage("train-0-1", commands=[Command(("calm_pretrain.cli", "train", "--config", "c.yaml"))], needs=("prep",),
              slurm=SlurmJob("slurm/sweep.sbatch", (str(out),), ("--array=0-1", "--nodes=2"), job_name="tr")),
        Stage("export", commands=[Command(("calm_pretrain.cli", "export", "--checkpoint", "r", "--out", "o"),
                                          processes=2)], needs=("prep",),
              slurm=SlurmJob(directives=("--gpus-per-node=1",))),
        Stage("eval", commands=[Command(("calm_pretrain.sweep", "evaluate", str(out)))], needs=("train-0-1", "export"),
              about="score\nevery point"),
    ])


def test_slurm_runner_writes_the_graph_as_an_afterok_chain(tmp_path):
    out = tmp_path / "plan dir"
    submit = SlurmRunner(out, "a test graph", "tests/test_workflow.py", next_step="all in").write(_diamond(out))
    script = submit.read_text()
    assert 'submit train-0-1 --dependency=afterok:"$JOB_PREP" --array=0-1 --nodes=2 --job-name=tr ' \
           '--output="$PLAN/logs/train-0-1-%A_%a.out" slurm/sweep.sbatch "$PLAN"' in script
    assert 'submit eval --dependency=afterok:"$JOB_TRAIN_0_1":"$JOB_EXPORT" --job-name=eval ' \
           '--output="$PLAN/logs/eval-%j.out" "$PLAN/stages/eval.sbatch"' in script
    assert "# score\n# every point\n" in script and "JOB_EVAL" not in script  # no stage waits for eval
    prep = (out / "stages" / "prep.sbatch").read_text()
    assert "OMP_NUM_THREADS=2 \"${PYTHON:-python3}\" -m data_pipeline.cli tokenize 'in dir/x.jsonl' -o " \
           f"'{out}/tok'" in prep and "#SBATCH --job-name=prep" in prep
    export = (out / "stages" / "export.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=1" in export
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m calm_pretrain.cli export" in export
    assert not (out / "stages" / "train-0-1.sbatch").exists()  # submitted through slurm/sweep.sbatch
    generated = [submit, *sorted((out / "stages").glob("*.sbatch"))]
    r = subprocess.run([shellcheck(), "--severity=style", *map(str, generated)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    # Submitted: each job waits for the job ids of exactly the stages it needs.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(submit)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("submitted; all in")
    calls = {line.split("|")[-1]: line.split("|") for line in (tmp_path / "calls").read_text().splitlines()}
    prep_id, train_id, export_id, eval_id = (calls[k][0] for k in (
        f"{out}/stages/prep.sbatch", str(out), f"{out}/stages/export.sbatch", f"{out}/stages/eval.sbatch"))
    assert [prep_id, train_id, export_id, eval_id] == ["101", "102", "103", "104"]
    assert not any(a.startswith("--dependency") for a in calls[f"{out}/stages/prep.sbatch"])
    assert f"--dependency=afterok:{prep_id}" in calls[str(out)] and "--array=0-1" in calls[str(out)]
    assert f"--dependency=afterok:{prep_id}" in calls[f"{out}/stages/export.sbatch"]
    assert f"--dependency=afterok:{train_id}:{export_id}" in calls[f"{out}/stages/eval.sbatch"]
    assert (out / "logs" / "submit-eval.log").read_text().strip() == "104;cluster"


def test_slurm_runner_refuses_in_process_stages_and_clashing_job_variables(tmp_path):
    with pytest.raises(WorkflowError, match="stage 'report' does in-process work"):
        SlurmRunner(tmp_path, "t", "t").write(Graph([Stage("report", result=lambda: {})]))
    with pytest.raises(WorkflowError, match="its job variable JOB_ENCODE_K1 is another stage's too"):
        SlurmRunner(tmp_path, "t", "t").write(Graph([_stage("encode-k1", ["m"]), _stage("encode_k1", ["m"])]))
    assert not (tmp_path / "submit.sh").exists()


# ------------------------------------------------------------------------------------------------
# The two workflows built on it
# ------------------------------------------------------------------------------------------------
def test_the_main_job_is_one_graph_with_its_stages_in_order(tmp_path):
    from calm_pretrain.demo import demo_graph
    from calm_pretrain.demo.stages import prepare

    ctx = prepare(tmp_path / "run", None, [], 1.0, lambda s: None)
    g = demo_graph(ctx)
    assert g.names == ["corpus", "tokenizer", "tokenize", "autoencoder", "encode", "calm", "transformer", "evaluate",
                       "generate", "release", "plots"]
    assert g["calm"].needs == ("encode", "autoencoder") and g.needed_by("corpus") == ["tokenizer"]
    train = g["calm"].commands[0]
    assert train.argv == ("calm_pretrain.cli", "train", "--config", str(tmp_path / "run" / "configs" / "calm.yaml"))
    assert train.processes == ctx.pipe.stages.calm.processes and g["tokenize"].concurrent
    with pytest.raises(WorkflowError, match="stage 'corpus' does in-process work"):  # not a batch job
        SlurmRunner(tmp_path / "slurm", "t", "t").write(g)


def test_the_sweeps_graph_follows_the_plans_dependencies(tmp_path):
    from calm_pretrain.sweep import make_plan
    from calm_pretrain.sweep.submit import plan_graph

    plan = make_plan(REPO / "configs/sweeps/tiny_scaling.yaml", tmp_path / "plan")
    g = plan_graph(plan, tmp_path / "plan")
    assert g.names[:2] == ["ae", "export-ae"] and g.names[-1] == "eval"
    for p in plan["points"]:  # the array holding a point waits for exactly the point's stages
        stage = next(s for s in g if s.name.startswith("train-") and
                     Command(("calm_pretrain.cli", "train", "--config", p["config"])) in s.commands)
        assert list(stage.needs) == p["depends_on"]
    assert set(g["eval"].needs) == {s.name for s in g if s.name.startswith("train-")} | {"export-ae"}
    assert all(c.argv[0] in ("calm_pretrain.cli", "calm_pretrain.sweep", "data_pipeline.cli") for s in g for c in s.commands)
