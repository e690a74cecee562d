"""The README's main job (`calm-pretrain demo`) end to end, at a size CI can afford: every stage runs the
real commands (calm-data tokenize/encode, calm-pretrain train under torchrun with 2 ZeRO-1 processes,
calm-pretrain export); each stage's outputs and the summary's numbers are checked against the files."""
import json
import math

import pytest
import torch

from calm_pretrain.config import ConfigError
from calm_pretrain.demo import SettingsChanged, format_summary, load_pipeline, read_metrics, run_demo
from tests.helpers.brier import brierlm_of

STAGES = ["corpus", "tokenizer", "tokenize", "autoencoder", "encode", "calm", "transformer", "evaluate", "generate",
          "release", "plots"]
# A smaller model and corpus than the default; the pipeline, the commands and the process layout are the same.
SMALL = ["corpus.max_documents=800", "tokenizer.vocab_size=512", "eval.blocks=8", "generate.tokens=12",
         "generate.candidates=8",
         "ae.model.vocab_size=512", "ae.model.hidden_size=128", "ae.model.intermediate_size=256",
         "ae.train.max_steps=40", "ae.train.warmup_steps=5", "ae.train.micro_batch_size=8", "ae.train.log_every=5",
         "ae.eval.max_blocks=8",
         "calm.model.vocab_size=512", "calm.model.num_layers=2", "calm.model.hidden_size=64",
         "calm.model.intermediate_size=128", "calm.train.max_steps=8", "calm.train.warmup_steps=2",
         "calm.train.log_every=1",
         "transformer.model.vocab_size=512", "transformer.model.num_layers=2", "transformer.model.hidden_size=64",
         "transformer.model.intermediate_size=128", "transformer.train.max_steps=8", "transformer.train.warmup_steps=2",
         "transformer.train.log_every=1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    logs = []
    summary = run_demo(run, overrides=SMALL, log=logs.append)
    return run, {row["stage"]: row for row in summary}, [row["stage"] for row in summary], logs


@pytest.mark.slow
def test_every_stage_runs_in_order_and_the_summary_matches_the_files(demo):
    run, rows, order, logs = demo
    assert order == STAGES
    saved = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == STAGES
    assert saved["total_seconds"] == pytest.approx(sum(r["seconds"] for r in saved["stages"]), abs=0.2)
    table = logs[-1]
    assert table.strip() == format_summary(saved["stages"]).strip()
    for stage in STAGES:  # one line per stage with its time and key metric
        line = next(x for x in table.splitlines() if x.startswith(stage + " "))
        assert f"{rows[stage]['seconds']:.1f}s" in line and rows[stage]["metric"] in line


@pytest.mark.slow
def test_corpus_tokenizer_and_token_shards(demo):
    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizers import load_tokenizer

    run, rows, _, _ = demo
    train = (run / "corpus" / "train.jsonl").read_text().splitlines()
    heldout = (run / "corpus" / "heldout.jsonl").read_text().splitlines()
    assert len(train) == rows["corpus"]["documents"] and len(heldout) == rows["corpus"]["heldout_documents"]
    assert len(train) + len(heldout) == 800 and len(heldout) == 40
    held_texts = {json.loads(x)["text"] for x in heldout}
    assert not held_texts & {json.loads(x)["text"] for x in train}
    tok = load_tokenizer(str(run / "tokenizer"))
    assert tok.vocab_size == rows["tokenizer"]["vocab_size"] <= 512
    for name in ("ae_tokens", "lm_tokens", "heldout"):
        m = load_manifest(run / "data" / name)
        assert m.num_tokens == rows["tokenize"][name] > 0
        assert m.tokenizer_fingerprint == tok.fingerprint


@pytest.mark.slow
def test_autoencoder_stage_trains_evaluates_on_held_out_text_and_releases(demo):
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.ae_io import autoencoder_fingerprint
    from data_pipeline.manifest import load_manifest

    run, rows, _, _ = demo
    ae_row = rows["autoencoder"]
    metrics = read_metrics(run / "ae")
    assert metrics[-1]["step"] == ae_row["steps"] == 40
    assert ae_row["accuracy"] == metrics[-1]["eval/accuracy"]
    assert ae_row["accuracy_noise_0_3"] == metrics[-1]["eval/accuracy_noise_0.3"]
    assert ae_row["loss_last"] < ae_row["loss_first"] - 1.0  # it learned something in 40 steps
    assert 0.05 < ae_row["accuracy"] <= 1.0 and 0.0 < ae_row["accuracy_noise_0_3"] <= ae_row["accuracy"] + 0.02
    # The released AE is the trained one, it encoded the latents, and recomputing its held-out accuracy
    # on the blocks the trainer evaluated gives the summary's number.
    from calm_pretrain.demo import load_trained

    encoder = load_autoencoder(run / "release" / "ae")
    trained = load_trained(run / "ae")
    assert encoder.state_dict().keys() == trained.state_dict().keys()
    for name, t in trained.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], t), name
    assert load_manifest(run / "data" / "latents").ae_fingerprint == autoencoder_fingerprint(encoder)
    from calm_pretrain.eval.source import heldout_blocks

    blocks = heldout_blocks(run / "data" / "heldout", 8)  # the trainer's eval.max_blocks = 8
    with torch.no_grad():
        correct = sum((encoder.reconstruct(ids) == ids).sum().item() for ids in blocks)
    total = sum(b.numel() for b in blocks)  # a near-tie may flip with another thread count: allow 3 tokens
    assert correct / total == pytest.approx(ae_row["accuracy"], abs=3 / total)


@pytest.mark.slow
def test_encode_and_the_two_language_models_ran_as_two_zero1_processes(demo):
    from data_pipeline.manifest import load_manifest

    run, rows, _, _ = demo
    m = load_manifest(run / "data" / "latents")
    assert m.num_samples == rows["encode"]["samples"] and m.num_tokens == rows["tokenize"]["lm_tokens"]
    assert rows["encode"]["bytes_per_token"] == pytest.approx(m.num_bytes / m.num_tokens)
    for name in ("calm", "transformer"):
        row, metrics = rows[name], read_metrics(run / name)
        assert [r["step"] for r in metrics][-1] == row["steps"] == 8
        assert all(math.isfinite(r["loss"]) for r in metrics)
        ranks = (run / name / "ranks.txt").read_text().splitlines()
        assert len(ranks) == 2 and ranks[0].startswith("rank 0/2") and ranks[1].startswith("rank 1/2")
        cfg = (run / "configs" / f"{name}.yaml").read_text()
        assert "zero_stage: 1" in cfg and str(run / "data") in cfg  # the resolved config that was launched
        assert row["processes"] == 2 and row["train_flops"] > 0
        # the trainer's held-out evaluation at the end: BrierLM is the geometric mean of its own Brier-n
        assert metrics[-1]["eval/brierlm"] == pytest.approx(brierlm_of(metrics[-1], "eval/"), abs=1e-9)
        # global batch = micro-batch 4 x 2 processes, 256 tokens per sample
        assert row["train_tokens"] == 8 * 4 * 2 * 256


@pytest.mark.slow
def test_brierlm_samples_release_and_plot(demo):
    from calm_pretrain.cli import main as cli

    run, rows, _, logs = demo
    scores = json.loads((run / "eval.json").read_text())
    for name in ("calm", "transformer"):
        assert rows["evaluate"][name] == scores[name]["brierlm"]
        assert scores[name]["brierlm"] == pytest.approx(brierlm_of(scores[name]), abs=1e-9)
        assert rows["evaluate"][f"{name}_brier_n"] == [scores[name][f"brier_{n}"] for n in range(1, 5)]
    assert rows["evaluate"]["heldout_tokens"] == 8 * 256
    samples = json.loads((run / "samples.json").read_text())
    assert set(samples) == {"calm T=1", "calm T=1/2", "transformer T=1", "transformer T=1/2"}
    assert all(text.startswith("The module provides") for text in samples.values())
    # The releases reload (CALM with its embedded AE) and generate exactly the trained model's sample.
    for name in ("calm", "transformer"):
        reloaded = rows["release"]["reloaded"][name]
        assert reloaded["identical_to_trained"] and reloaded["text"] == samples[f"{name} T=1"]
        assert cli(["release-info", str(run / "release" / name)]) == 0
    assert cli(["release-info", str(run / "release" / "ae")]) == 0
    # the CALM release names its autoencoder (the one it was trained and evaluated with) and embeds it
    assert json.loads((run / "release" / "calm" / "config.json").read_text())["ae_path"] == str(
        (run / "release" / "ae").resolve())
    png = (run / "plots" / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_a_rerun_reuses_every_stage_and_refuses_changed_settings(demo):
    run, rows, _, _ = demo
    again = []
    summary = run_demo(run, overrides=SMALL, log=again.append)
    assert sum("reusing" in line for line in again) == len(STAGES)
    assert not any(line.startswith("  ") for line in again)  # no command was launched
    assert {r["stage"]: r["metric"] for r in summary} == {s: rows[s]["metric"] for s in STAGES}
    with pytest.raises(SettingsChanged, match="'calm'"):
        run_demo(run, overrides=[*SMALL, "calm.train.max_steps=9"], log=lambda s: None)


def test_pipeline_config_routes_overrides_and_names_bad_keys():
    pipe = load_pipeline(None, ["ae.train.lr=1e-3", "stages.calm.processes=1", "tokenizer.vocab_size=2048"])
    assert pipe.stages.ae.overrides == ["train.lr=1e-3"] and pipe.stages.calm.processes == 1
    assert pipe.tokenizer.vocab_size == 2048 and pipe.stages.ae.config == "configs/demo/ae.yaml"
    with pytest.raises(ConfigError, match="corpus.bogus"):
        load_pipeline(None, ["corpus.bogus=1"])
    with pytest.raises(ConfigError, match="corpus.heldout"):
        load_pipeline(None, ["corpus.inputs=[data/x.jsonl]"])
