"""slurm/*.sbatch through the Slurm stand-ins in tests/slurm_standins (srun, sbatch, scontrol, scancel):
lint, a two-"node" training job that is signalled, saves, requeues itself and resumes, a sweep as a
job array, and pre-encoding. Every task runs on this machine, on the CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, shellcheck

STANDINS = REPO / "tests" / "slurm_standins"
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh"]
REQUEUE = 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from tests.helpers.data import write_token_dataset

    d = tmp_path_factory.mktemp("data") / "tokens"
    write_token_dataset(d, np.random.default_rng(0).integers(3, 64, (96, 32)), k=1)
    return d


def _config(path: Path, tokens: Path, out: Path, **train) -> Path:
    cfg = {"name": path.stem.replace(" ", "-"),
           "model": {"arch": "transformer", "vocab_size": 64, "num_layers": 2, "hidden_size": 32,
                     "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 2, "pad_token_id": 0,
                     "bos_token_id": 1, "eos_token_id": 2},
           "data": {"train": [str(tokens)], "seq_chunks": 32},
           "train": {"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 2, "lr": 3e-3,
                     "precision": "fp32", "log_every": 1, "save_every": 1000, "wandb": "off",
                     "zero_stage": 1, "output_dir": str(out), **train}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "PATH": f"{STANDINS}{os.pathsep}{os.environ['PATH']}",
            "SLURM_STANDIN_DIR": str(tmp_path / "slurm-state"), "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NPROC_PER_NODE": "1", "WANDB_MODE": "offline",
            "CALM_MASTER_PORT": str(_free_port()), **extra}


def _sbatch(args, env, log: Path, timeout=240) -> int:
    """`sbatch ARGS` (stand-in: runs to the end, requeues included) from the repository root."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(["sbatch", *map(str, args)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _signal_job_when(sbatch_args, env, log, job_id: str, ready, settle: float = 0.0) -> int:
    """Submit a job, and once `ready()` holds (and `settle` seconds later) send SIGUSR1 to its batch
    shell only, as `#SBATCH --signal=B:USR1@120` does before a time limit; the job's exit code."""
    with open(log, "ab") as out:
        job = subprocess.Popen(["sbatch", *sbatch_args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ready():
            assert job.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.01)
        time.sleep(settle)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        return job.wait(240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    # -x follows `source slurm/common.sh`; every severity down to style counts.
    r = subprocess.run([shellcheck(), "-x", "--severity=style", str(script)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_two_nodes_signal_save_requeue_resume(tmp_path, tokens):
    """Slurm's warning signal to the batch shell → SIGUSR1 through srun to both ranks → checkpoint,
    exit 75 → scontrol requeue → the same job runs again and resumes. Paths with spaces throughout."""
    steps = 30
    run_dir = tmp_path / "run dir"
    unused = tmp_path / "config's own output_dir"
    cfg = _config(tmp_path / "my configs" / "tiny run.yaml", tokens, unused, max_steps=steps)
    env = _env(tmp_path, SLURM_STANDIN_JOB_ID="4242", RUN_DIR=str(run_dir))
    log = tmp_path / "job.log"
    metrics = run_dir / "metrics.jsonl"
    code = _signal_job_when(["--nodes=2", "--nodelist=127.0.0.[1-2]", "slurm/train.sbatch", str(cfg), "train.lr=0.002"],
                            env, log, "4242", ready=lambda: metrics.is_file() and metrics.read_text().strip())
    text = log.read_text()
    assert code == 0, text
    first, _, second = text.partition("job 4242 (calm-train) restart 1 on")
    assert second, f"the job did not run again after its requeue\n{text}"
    # First run: both "nodes" started, the batch shell forwarded the signal, every rank saved and exited 75.
    assert "on 2 node(s): 127.0.0.1 127.0.0.2" in first and "world size 2; rendezvous 127.0.0.1:" in first
    assert first.count("rank 0/2 host") == 1 and first.count("rank 1/2 host") == 1, first
    assert "batch shell received SIGUSR1: forwarding SIGUSR1" in first
    assert "received SIGUSR1: saving a checkpoint" in first and "exiting with 75" in first
    assert "forcing job termination" not in text  # no SIGTERM ever reached srun
    assert "the ranks saved a checkpoint and exited 75" in first and "requeueing job 4242 (restart 1)" in first
    assert (tmp_path / "slurm-state" / "requeued").read_text().split() == ["4242"]
    # Second run: same job id and run directory, resumed from the checkpoint, ran to the end.
    assert "resumed from" in second and second.count("rank 1/2 host") == 1, second
    assert "finished (exit 0)" in second
    for harmless in ("Transformer Engine and Apex are not installed", "all_gather_into_tensor` is deprecated"):
        assert harmless not in text, f"a warning that says nothing is wrong reached the log: {harmless}"
    saved = [line for line in first.splitlines() if "saved at step" in line]
    assert saved and int(saved[0].split("saved at step ")[1].split(";")[0]) < steps, first
    assert _steps(run_dir) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.002  # overrides reach the ranks
    assert not unused.exists()  # RUN_DIR wins over the config's train.output_dir
    assert (run_dir / "slurm.log").read_text().count("requeueing job 4242") == 1


@pytest.mark.slow
def test_signal_while_the_ranks_start_still_requeues(tmp_path, tokens):
    """A signal during start-up: ranks still importing die of it (SIGUSR1's default action) and nothing is
    saved; ranks past `run_training`'s first line save at the first step boundary. Either way the job is
    requeued and finishes."""
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", tokens, run_dir, max_steps=3)
    env = _env(tmp_path, SLURM_STANDIN_JOB_ID="77")
    log = tmp_path / "job.log"
    # "run directory" is printed just before srun starts the ranks; 0.5 s later they are importing torch.
    code = _signal_job_when(["--nodes=2", "--nodelist=127.0.0.[1-2]", "slurm/train.sbatch", str(cfg)], env, log, "77",
                            ready=lambda: "run directory" in log.read_text(), settle=0.5)
    text = log.read_text()
    first, _, second = text.partition("job 77 (calm-train) restart 1 on")
    assert code == 0 and second, text
    assert "requeueing job 77 (restart 1)" in first and "finished (exit 0)" in second
    if "exit 138 after SIGUSR1" in first:  # still importing: SIGUSR1's default action stopped the ranks
        assert "rank 0/2 host" not in first and "resumed from" not in second
    else:  # the ranks had installed their handler: they saved at the first step boundary and exited 75
        assert "the ranks saved a checkpoint and exited 75" in first and "resumed from" in second, first
    assert _steps(run_dir) == [1, 2, 3]


def test_a_failure_is_not_requeued(tmp_path, tokens):
    """A crash is not a preemption: the exit code comes back and nothing is requeued."""
    cfg = _config(tmp_path / "broken.yaml", tokens, tmp_path / "run", max_steps=2)
    text = yaml.safe_load(cfg.read_text())
    text["data"]["train"] = [str(tmp_path / "missing shards")]
    cfg.write_text(yaml.safe_dump(text))
    log = tmp_path / "job.log"
    code = _sbatch([REPO / "slurm" / "train.sbatch", cfg], _env(tmp_path), log)
    assert code not in (0, REQUEUE), log.read_text()
    assert "not requeued" in log.read_text() and not (tmp_path / "slurm-state" / "requeued").exists()


def test_sweep_job_array(tmp_path, tokens):
    plan = tmp_path / "sweep plan"
    for i, lr in enumerate([1e-3, 3e-3]):
        _config(plan / "configs" / f"{i:04d}.yaml", tokens, plan / "runs" / f"{i:04d}", lr=lr, max_steps=3)
    log = tmp_path / "sweep.log"
    assert _sbatch(["--array=0-1", "slurm/sweep.sbatch", plan], _env(tmp_path), log) == 0, log.read_text()
    text = log.read_text()
    assert "array task 0 on 1 node(s)" in text and "array task 1 on 1 node(s)" in text
    for i, lr in enumerate([1e-3, 3e-3]):
        run = plan / "runs" / f"{i:04d}"
        assert _steps(run) == [1, 2, 3]
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == lr

    # Refusals, before anything starts: an index past the plan, two points sharing a run directory.
    log = tmp_path / "refused.log"
    assert _sbatch(["--array=2", "slurm/sweep.sbatch", plan], _env(tmp_path), log) == 2
    assert "does not exist" in log.read_text() and "--array=0-1" in log.read_text()
    _config(plan / "configs" / "0002.yaml", tokens, plan / "runs" / "0001")
    assert _sbatch(["--array=2", "slurm/sweep.sbatch", plan], _env(tmp_path), log) == 2
    assert "share the run directory" in log.read_text()


def test_encode_two_nodes_is_idempotent(tmp_path):
    import torch

    from calm_pretrain.models.autoencoder.model import Autoencoder
    from calm_pretrain.release.autoencoder import save_autoencoder
    from data_pipeline.manifest import load_manifest
    from tests.helpers.data import write_token_dataset
    from tests.helpers.models import tiny_ae_config

    tok = tmp_path / "tok ens"
    write_token_dataset(tok, np.random.default_rng(0).integers(3, 4096, (24, 32)), k=4, shards=3, rows_per_batch=4)
    torch.manual_seed(0)
    save_autoencoder(Autoencoder(tiny_ae_config()).eval(), tmp_path / "ae")
    out = tmp_path / "lat ents"
    args = ["--nodes=2", "slurm/encode.sbatch", tok, tmp_path / "ae", out, "--batch-size", "4", "--no-progress"]
    log = tmp_path / "encode.log"
    assert _sbatch(args, _env(tmp_path), log) == 0, log.read_text()
    text = log.read_text()
    assert "encode rank 0/2" in text and "encode rank 1/2" in text, text
    m = load_manifest(out)
    assert m.complete and len(m.shards) == 3 and m.num_samples == 24
    assert _sbatch(args, _env(tmp_path), log) == 0
    again = log.read_text()[len(text):]
    assert "rank 0/2 on cpu: 2 shards, 2 already done" in again and "1 shards, 1 already done" in again, again


def test_the_rendezvous_port_is_the_same_in_common_sh_and_in_python():
    from calm_pretrain.parallel.distributed import master_port_for_job

    jobs = [0, 1, 14999, 15000, 123456, 987654321]
    script = f"source {REPO / 'slurm' / 'common.sh'}; for j in {' '.join(map(str, jobs))}; do calm_master_port $j; done"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert [int(p) for p in out] == [master_port_for_job(j) for j in jobs]
    assert len(set(out)) > 1 and all(15000 <= int(p) < 30000 for p in out)


def test_an_srun_task_gets_its_rank_from_slurm_and_the_batch_shell_stays_one_process():
    from calm_pretrain.parallel.distributed import master_port_for_job, rank_env_from_slurm

    task = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "MASTER_ADDR": "node7"}
    rank_env_from_slurm(task)
    assert (task["RANK"], task["WORLD_SIZE"], task["LOCAL_RANK"]) == ("3", "4", "1")
    assert task["MASTER_PORT"] == str(master_port_for_job(4242)) and task["MASTER_ADDR"] == "node7"
    shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242"}  # no SLURM_STEP_NUM_TASKS
    rank_env_from_slurm(shell)
    assert "RANK" not in shell and "MASTER_PORT" not in shell
    torchrun = {**task, "RANK": "0", "WORLD_SIZE": "2"}  # a launcher's own variables win
    rank_env_from_slurm(torchrun)
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"]) == ("0", "2")
