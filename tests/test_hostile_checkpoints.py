"""Hostile and unlucky cases of checkpoints and run directories (issue 15), one test per case.

Every test drives the real `calm-pretrain` command line (or the real trainer) on real files, does
what a hostile or unlucky user would do to the run directory, and checks that nothing is lost and
that the message is one clear line naming the problem and the file.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calm_pretrain.train.checkpoint import verify_checkpoint
from tests.helpers.ranks import launch_ranks

REQUEUE = 75


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Token shards: 96 samples of 32 ids below 64 (k=1, the Transformer's)."""
    from tests.helpers.data import write_token_dataset

    root = tmp_path_factory.mktemp("tokens")
    write_token_dataset(root / "train", np.random.default_rng(0).integers(3, 64, (96, 32)), k=1)
    return root / "train"


def _config(path: Path, data: Path, out: Path, model: dict | None = None, **train) -> Path:
    """A tiny Transformer run config at `path`, training on `data` into `out`."""
    cfg = {"name": "hostile", "model": {"arch": "transformer", "vocab_size": 64, "num_layers": 1, "hidden_size": 32,
                                        "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 2,
                                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **(model or {})},
           "data": {"train": [str(data)], "seq_chunks": 32},
           "train": {"max_steps": 6, "micro_batch_size": 2, "warmup_steps": 1, "lr": 3e-3, "precision": "fp32",
                     "log_every": 1, "save_every": 2, "keep_last": 3, "wandb": "off", "output_dir": str(out),
                     **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`calm-pretrain train` in one process (plain PyTorch engine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "calm_pretrain.cli", "train", "--config", str(cfg), *overrides],
                          capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. pruning after a fallback ---------------------------------------------------------------
def test_pruning_after_a_fallback_keeps_the_good_checkpoints(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run)
    first = _train(cfg)
    assert first.returncode == 0, first.stderr
    root = run / "checkpoints"
    assert _steps(root) == ["step_00000002", "step_00000004", "step_00000006"]
    engine_file = root / "step_00000006" / "engine" / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:1000])  # truncated

    second = _train(cfg, "train.max_steps=5", "train.save_every=1", "train.keep_last=1")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step_00000004 at step 4" in second.stdout
    # The damaged step 6 did not count as kept: step 5 (the newest intact) is there and `latest` names it.
    assert "step_00000005" in _steps(root)
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert "step_00000006 is damaged" in second.stdout and "not counted towards train.keep_last" in second.stdout

    third = _train(cfg, "train.max_steps=6", "train.save_every=1", "train.keep_last=1")
    assert third.returncode == 0, third.stderr
    assert "step_00000005 at step 5" in third.stdout
    assert (root / "latest").read_text().strip() == "step_00000006"


# ---- 2. divergence -----------------------------------------------------------------------------
@pytest.mark.parametrize("lr, stop, windows, kept", [
    (30, "training diverged: 10 suspect steps in a row at step 15", [], 3),  # finite: loss 4 -> 2000 -> 4e6
    (1e9, "20 non-finite steps in a row at step 25", [], 3),  # non-finite gradients from step 6 on
    # Judged when a window of 7 steps closes (and before the save at 10): the same steps, the same pin.
    (30, "training diverged: 10 suspect steps in a row at step 15", ["train.log_every=7", "train.save_every=10"], 2),
])
def test_a_divergence_keeps_the_last_checkpoint_before_it_and_says_so(tmp_path, tokens, lr, stop, windows, kept):
    import torch

    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=4, save_every=2, keep_last=2, divergence_warmup=2)
    assert _train(cfg).returncode == 0
    diverging = _train(cfg, f"train.lr={lr}", "train.max_steps=40", *windows)
    assert diverging.returncode == 1
    root = run / "checkpoints"
    first_suspect = next(r["step"] for r in _metrics(run) if r["suspect"])
    assert first_suspect == 6  # step 5's update shows in step 6's loss and gradient
    good = root / "step_00000004"
    message = diverging.stderr.strip()
    assert "\n" not in message and message.startswith(f"error: {stop}"), message  # one line, no traceback
    assert message.endswith(f"the newest checkpoint before the first suspect step 6 is {good}, kept (pinned in "
                            f"{root / 'pinned.json'}: never pruned); later checkpoints may hold diverged weights")
    # Saves went on (keep_last=2) and pruned everything else, but not the pinned pre-divergence checkpoint.
    assert "step_00000004" in _steps(root) and len(_steps(root)) == kept and verify_checkpoint(good) is None
    weights = torch.load(good / "engine" / "engine.pt", weights_only=True)["model"]
    assert max(v.abs().max().item() for v in weights.values()) < 10  # the weights from before the divergence


# ---- 3. two runs on one output directory -------------------------------------------------------
HOLD_LOCK = """
import sys, time
from calm_pretrain.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_live_runs_directory_is_refused(tmp_path, tokens):
    import socket

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = _config(tmp_path / "run.yaml", tokens, run)
        second = _train(cfg)
        assert second.returncode == 1
        message = second.stderr.strip()
        assert message.startswith(f"error: {run}: another run is using this output directory (host "
                                  f"{socket.gethostname()}, pid {holder.pid}, started "), message
        assert f"lock file {run / 'train.lock'}" in message and "\n" not in message
        # Under torchrun-style ranks: only rank 0 looks, every rank refuses alike.
        assert launch_ranks(2, ["train", "--config", str(cfg)], tmp_path / "logs").wait(120, expect=1) == [1, 1]
        for r in (0, 1):
            assert f"pid {holder.pid}" in (tmp_path / "logs" / f"rank{r}.log").read_text()
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, tokens):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                "started": "2026-01-01T00:00:00", "token": "old"}))
    result = _train(_config(tmp_path / "run.yaml", tokens, run, max_steps=2))
    assert result.returncode == 0, result.stderr
    assert f"WARNING: took over the stale lock {run / 'train.lock'} of a run that is gone (host " \
           f"{socket.gethostname()}, pid {dead.pid}" in result.stdout
    assert not (run / "train.lock").exists()  # released at the end


# ---- 4. no code runs from a checkpoint file ----------------------------------------------------
class _Payload:
    """Unpickling this calls exec(...): it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _plant(checkpoint: Path, rel: str, marker: Path) -> Path:
    """Add the payload to a real file of `checkpoint` and rewrite manifest.json to match it (a careful
    attacker's file passes the checksums)."""
    import torch

    from calm_pretrain.safe_load import safe_load
    from tests.helpers.runs import reseal

    target = checkpoint / rel
    state = safe_load(target)
    state["payload"] = _Payload(marker)
    torch.save(state, target)
    reseal(checkpoint, rel)
    assert verify_checkpoint(checkpoint) is None
    return target


@pytest.mark.slow
def test_a_checkpoint_file_with_a_malicious_reduce_is_refused_not_run(tmp_path, tokens):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=2, zero_stage=1)
    assert launch_ranks(2, ["train", "--config", str(cfg)], tmp_path / "logs").wait(240) == [0, 0]
    planted = _plant(run / "checkpoints" / "step_00000002", "engine/mp_rank_00_model_states.pt", marker)
    refusal = f"{planted}: refusing to load it: it holds a pickled object that is not one of the types"

    export = subprocess.run([sys.executable, "-m", "calm_pretrain.cli", "export", "--checkpoint", str(run),
                             "--out", str(tmp_path / "release")], capture_output=True, text=True, timeout=120)
    assert export.returncode == 1 and refusal in export.stderr and "GLOBAL exec" in export.stderr, export.stderr
    assert not marker.exists() and not (tmp_path / "release").exists()

    # Resume at the same layout (DeepSpeed's load_checkpoint, every rank) and at another one (through
    # the universal conversion, ds_to_universal): both refuse, neither runs the payload.
    for ranks, extra, logs in ((2, [], "same"), (1, ["train.grad_accum_steps=2"], "universal")):
        codes = launch_ranks(ranks, ["train", "--config", str(cfg), "train.max_steps=4", *extra],
                             tmp_path / logs).wait(240, expect=1)
        log = "".join(p.read_text() for p in (tmp_path / logs).glob("rank*.log"))
        assert codes == [1] * ranks and f"error: {refusal}" in log, log
        assert not marker.exists()

    # The file is hostile indeed: an unrestricted torch.load runs it.
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(planted)!r}, weights_only=False)"],
                   capture_output=True, timeout=60)
    assert marker.read_text() == "code ran"


# ---- 5. metrics.jsonl: each step once, valid JSON ----------------------------------------------
def test_metrics_hold_each_step_once_and_only_valid_json(tmp_path, tokens):
    import signal
    import time

    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=400, save_every=1000)
    # Killed before its first checkpoint, after some steps were logged.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    killed = subprocess.Popen([sys.executable, "-m", "calm_pretrain.cli", "train", "--config", str(cfg)],
                              env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (run / "checkpoints").exists()
    # The relaunch starts afresh (no checkpoint): the killed run's rows go.
    fresh = _train(cfg, "train.max_steps=4", "train.save_every=2")
    assert fresh.returncode == 0, fresh.stderr
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]  # not 1..n of the killed run, then 1..4
    # A resume from step 2 drops steps 3 and 4 first, then computes them again.
    (run / "checkpoints" / "step_00000004").rename(run / "checkpoints" / "gone")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    resumed = _train(cfg, "train.max_steps=5", "train.save_every=2", "train.lr=1e9")  # lr 1e9: a NaN grad norm
    assert resumed.returncode == 0, resumed.stderr
    lines = metrics.read_text().splitlines()
    records = [json.loads(x, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for x in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["grad_norm"] is None and records[-1]["skipped"]


# ---- 6. torchrun: the requeue code survives, orphaned workers stop -----------------------------
def _wait_for_steps(run: Path, n: int, proc, timeout: float = 120) -> None:
    import time

    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, "the run ended or hung before its first steps"
        time.sleep(0.05)


def _torchrun_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
def test_sigterm_under_the_launcher_ends_with_the_requeue_code(tmp_path, tokens):
    import signal

    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=100000, save_every=100000)
    with open(tmp_path / "launch.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "calm_pretrain.cli", "launch", "--standalone",
                                 "--nproc-per-node", "2", "--", "train", "--config", str(cfg)],
                                env=_torchrun_env(), stdout=out, stderr=subprocess.STDOUT)
        _wait_for_steps(run, 2, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    log = (tmp_path / "launch.log").read_text()
    assert code == REQUEUE, log
    assert "received SIGUSR1: saving a checkpoint" in log and "exiting 75" in log
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert verify_checkpoint(run / "checkpoints" / saved) is None


@pytest.mark.slow
def test_kill_9_of_torchrun_stops_its_workers(tmp_path, tokens):
    import signal
    import time

    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=100000, save_every=100000)
    with open(tmp_path / "torchrun.log", "w") as out:
        torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "calm_pretrain.cli", "train", "--config", str(cfg)],
                                    env=_torchrun_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_steps(run, 2, torchrun)
        workers = [int(line.split(" pid ")[1].split()[0]) for line in (run / "ranks.txt").read_text().splitlines()]
        os.kill(torchrun.pid, signal.SIGKILL)
        torchrun.wait()
        deadline = time.time() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "torchrun.log").read_text()
    assert not alive, f"workers {alive} still training 30 s after torchrun was killed\n{log[-3000:]}"
    assert "the launcher (pid" in log and "is gone" in log
    assert not (run / "train.lock").exists()  # they saved and ended cleanly, releasing the directory
    assert verify_checkpoint(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()) is None


# ---- 7. unclear errors of the training path, made clear -----------------------------------------
def test_a_refused_resume_leaves_config_and_ranks_as_they_were(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=2)
    assert _train(cfg).returncode == 0
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "ranks.txt")}
    changed = _train(_config(tmp_path / "changed.yaml", tokens, run, model={"intermediate_size": 96}, max_steps=4))
    assert changed.returncode == 1 and "the model changed since it was saved" in changed.stderr
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_resuming_with_the_other_engine_says_what_to_launch(tmp_path, tokens):
    plain, ds = tmp_path / "plain", tmp_path / "ds"
    plain_cfg = _config(tmp_path / "plain.yaml", tokens, plain, max_steps=2)
    ds_cfg = _config(tmp_path / "ds.yaml", tokens, ds, max_steps=2)
    assert _train(plain_cfg).returncode == 0
    assert launch_ranks(1, ["train", "--config", str(ds_cfg)], tmp_path / "logs").wait(240) == [0]

    one = _train(ds_cfg, "train.max_steps=4")  # a DeepSpeed checkpoint in one plain process
    assert one.returncode == 1, one.stderr
    assert one.stderr.strip() == (
        f"error: {ds / 'checkpoints' / 'step_00000002'}: written by DeepSpeed (world size 1), but this run is one "
        f"plain-PyTorch process: launch it under torchrun (calm-pretrain launch --standalone --nproc-per-node N -- "
        f"train ...; another N is converted) or srun")
    codes = launch_ranks(1, ["train", "--config", str(plain_cfg), "train.max_steps=4"],
                         tmp_path / "logs2").wait(240, expect=1)  # a plain checkpoint under torchrun
    log = (tmp_path / "logs2" / "rank0.log").read_text()
    assert codes == [1] and "Traceback" not in log, log
    assert (f"error: {plain / 'checkpoints' / 'step_00000002'}: written by one plain-PyTorch process "
            f"(engine/engine.pt), but this run uses DeepSpeed") in log
    forced = _train(plain_cfg, "train.engine=deepspeed")  # DeepSpeed without a launcher: no mpi4py hunt
    assert forced.returncode == 2 and "train.engine=deepspeed needs ranks from a launcher" in forced.stderr


def test_train_without_data_fails_before_building_the_model(tmp_path, tokens):
    import time

    cfg = yaml.safe_load(_config(tmp_path / "run.yaml", tokens, tmp_path / "run").read_text())
    cfg["data"]["train"] = []
    cfg["model"].update(num_layers=48, hidden_size=4096, intermediate_size=16384, num_heads=32, num_kv_heads=32,
                        vocab_size=128000)  # ~10B parameters: building it would take minutes and 40 GB
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    result = _train(tmp_path / "big.yaml")
    assert result.returncode == 2 and time.time() - t0 < 60
    assert result.stderr.strip() == "config error: data.train: no training shards given (a list of shard directories)"


def test_held_out_shards_of_another_tokenizer_are_refused(tmp_path, tokens):
    from tests.helpers.data import write_token_dataset

    other = write_token_dataset(tmp_path / "held_out", np.random.default_rng(2).integers(3, 64, (8, 32)), k=1,
                                tokenizer={"spec": "other", "type": "test", "fingerprint": "other-tokenizer",
                                           "vocab_size": 64, "bos_id": 1, "eos_id": 2, "pad_id": 0})
    cfg = yaml.safe_load(_config(tmp_path / "run.yaml", tokens, tmp_path / "run").read_text())
    cfg["data"]["eval"] = str(tmp_path / "held_out")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    result = _train(tmp_path / "eval.yaml")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: data.eval {other.path} was made with another tokenizer (fingerprint other-tokenizer) than the "
        f"training data {tokens / 'manifest.json'} (fingerprint test-tokenizer): its scores would be computed on "
        f"other token ids")


def test_nan_inside_a_crc_valid_latent_shard_is_named_when_its_step_is_skipped(tmp_path, monkeypatch):
    import data_pipeline.shards
    from tests.helpers.data import write_latent_dataset

    rng = np.random.default_rng(0)
    n, chunks, k, d = 16, 8, 4, 16
    mu = rng.standard_normal((n, chunks, d)).astype(np.float32)
    mu[5, 3, 7] = np.nan  # the shard's checksums then describe the NaN faithfully
    with monkeypatch.context() as m:  # the writer refuses NaN: a hostile writer does not
        m.setattr(data_pipeline.shards.np, "isfinite", lambda x: np.ones(np.shape(x), bool))
        write_latent_dataset(tmp_path / "latents", rng.integers(3, 64, (n, chunks * k)), mu,
                             np.full((n, chunks, d), -2.0, np.float32), k=k)
    cfg = yaml.safe_load(_config(tmp_path / "run.yaml", tmp_path / "latents", tmp_path / "run").read_text())
    cfg["model"].update(arch="calm", k=k, latent_dim=d, head={"num_blocks": 1, "noise_size": 8, "num_samples": 4,
                                                            "num_target_samples": 8})
    cfg["data"]["seq_chunks"] = chunks
    cfg["train"].update(max_steps=8, save_every=100)  # one epoch: 8 steps of 2 samples
    (tmp_path / "calm.yaml").write_text(yaml.safe_dump(cfg))
    result = _train(tmp_path / "calm.yaml")
    assert result.returncode == 0, result.stderr
    skipped = [r for r in _metrics(tmp_path / "run") if r["skipped"]]
    shard = next((tmp_path / "latents").glob("*.arrow"))
    where = f"sample 5 of {tmp_path / 'latents' / 'manifest.json'} (shard {shard}, row 5)"
    assert len(skipped) == 1 and skipped[0]["nonfinite_inputs"] == [where]
    assert f"SKIPPED (non-finite; not finite: {where})" in result.stdout


def test_a_loss_near_zero_does_not_make_noise_look_like_a_divergence():
    """The absolute floor: CE at 0.04 with a 0.39 step is noise (seen in the tiny sweep), 4 -> 2000 is not."""
    from calm_pretrain.train.divergence import DivergenceMonitor

    calm = DivergenceMonitor(ratio=10, warmup=3, window=10)
    for loss in (0.04, 0.03, 0.05, 0.04):
        assert calm.check(loss, 0.5) is None
    assert calm.check(0.39, 0.5) is None
    assert calm.check(0.04, 6.0) is None  # a gradient-norm spike of 12x: common in healthy training
    assert "divergence_grad_norm_ratio=100" in calm.check(0.04, 80.0)
    spiking = DivergenceMonitor(ratio=10, warmup=3, window=10)
    for loss in (4.0, 3.9, 4.1):
        assert spiking.check(loss, 1.0) is None
    assert "more than train.divergence_ratio=10" in spiking.check(2000.0, 1.0)
