"""The README's main job, end to end at a very small number of steps, and its re-run reusing stages."""
import json

from calm_pretrain.demo import run_demo


def test_main_job_runs_every_stage_and_reuses_them(tmp_path):
    logs = []
    summary = run_demo(tmp_path / "run", steps_scale=0.02, log=logs.append, eval_blocks=8)
    stages = [row["stage"] for row in summary]
    assert stages == ["corpus", "tokenizer", "tokenize", "autoencoder", "encode", "calm", "transformer",
                      "evaluate", "generate"]
    rows = {row["stage"]: row for row in summary}
    assert rows["tokenize"]["lm_tokens"] > 100_000
    assert 0.0 <= rows["autoencoder"]["accuracy"] <= 1.0
    assert rows["encode"]["bytes_per_token"] > 0
    assert rows["evaluate"]["calm"] >= 0.0 and rows["evaluate"]["transformer"] >= 0.0
    assert len(rows["generate"]["samples"]) == 4
    for name in ("ae", "calm", "transformer"):
        lines = (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()
        assert lines and "loss" in json.loads(lines[-1])
    assert "key metric" in logs[-1]

    again = []
    run_demo(tmp_path / "run", steps_scale=0.02, log=again.append, eval_blocks=8)
    assert sum("reusing" in line for line in again) == 9
