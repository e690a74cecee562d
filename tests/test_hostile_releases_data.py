"""Hostile and unlucky input to releases, exports and the data pipeline (issue 15): each case ends in one
clear message naming the problem and the file, or in correct behaviour, with nothing lost.

Everything runs for real: a tiny tokenizer, token shards, an autoencoder release, latents encoded with it
by ``calm-data encode``, a CALM trained on them by ``calm-pretrain train``, and ``calm-pretrain export``.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from calm_pretrain.cli import main as cli_main
from calm_pretrain.release import ReleaseError, ReleaseWarning, export_release, import_release
from tests.helpers import REPO

V = 300  # vocabulary of the tokenizer, the autoencoder and CALM
CALM_SMALL = [f"model.vocab_size={V}", "model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=1",
              "model.num_heads=2", "model.num_kv_heads=2", "model.latent_dim=16", "model.head.noise_size=8",
              "model.head.num_blocks=1", "model.head.num_samples=2", "model.head.num_target_samples=4",
              "data.seq_chunks=8", "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_every=1",
              "train.engine=torch", "train.wandb=off", "train.save_every=2", "train.keep_last=5"]


def _tokenizer(directory, text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.tokenizers import DEMO_SPECIALS, HFTokenizer, load_tokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=DEMO_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text] * 20, trainer=trainer)
    pad, bos, eos = DEMO_SPECIALS[0], DEMO_SPECIALS[1], DEMO_SPECIALS[2]
    HFTokenizer(tk, str(directory), "bpe", bos, eos, pad).save(directory, bos=bos, eos=eos, pad=pad)
    return load_tokenizer(str(directory))


def _train(config_dir, run, latents, *overrides):
    cfg = config_dir / f"{run.name}.yaml"
    cfg.write_text((REPO / "configs/tiny/calm.yaml").read_text())
    argv = ["train", "--config", str(cfg), *CALM_SMALL, f"data.train=[{latents}]", f"train.output_dir={run}",
            *overrides]
    assert cli_main(argv) == 0
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tokenizer → token shards → AE release → latents (calm-data encode) → two CALM training runs."""
    from calm_pretrain.models import build_model
    from data_pipeline.cli import main as data_main
    from tests.helpers.data import write_token_dataset
    from tests.helpers.models import tiny_ae_config

    root = tmp_path_factory.mktemp("world")
    tok = _tokenizer(root / "tokenizer", "the release layout of the published checkpoints")
    _tokenizer(root / "other_tokenizer", "a different corpus gives different merges entirely")
    write_token_dataset(root / "tokens", np.random.default_rng(0).integers(3, 64, (16, 32)), k=4, vocab_size=V,
                        tokenizer=tok.describe())
    for name, seed in (("ae", 0), ("other_ae", 1)):
        torch.manual_seed(seed)
        export_release(build_model(tiny_ae_config(vocab_size=V, latent_dim=16, hidden_size=32, intermediate_size=48))
                       .eval(), root / name)
    assert data_main(["encode", str(root / "tokens"), "--ae", str(root / "ae"), "-o", str(root / "latents"),
                      "--no-progress"]) == 0
    _train(root, root / "run", root / "latents", "train.max_steps=4")
    _train(root, root / "run_seed2", root / "latents", "train.max_steps=2", "train.seed=2")
    return root


def _export(capsys, *argv):
    rc = cli_main(["export", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _sidecar(d):
    return json.loads((d / "calm_pretrain.json").read_text())


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


# --------------------------------------------------------------------------------------------
# Item 5: export --out over an existing release
# --------------------------------------------------------------------------------------------
def test_export_out_never_replaces_a_release_of_another_model(world, tmp_path, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(world / "ae", ae)
    before = _files(ae)
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", ae, "--overwrite")
    assert rc == 1 and "holds a release of another model (Autoencoder" in err and str(ae) in err
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", ae, "--embed-ae", ae)
    assert rc == 1 and "is the autoencoder release given to --embed-ae" in err
    assert _files(ae) == before  # the AE the latents point to is untouched

    out = tmp_path / "calm"
    assert _export(capsys, "--checkpoint", world / "run", "--out", out)[0] == 0
    assert _export(capsys, "--checkpoint", world / "run", "--out", out)[0] == 0  # the same checkpoint again
    # another training run of the same model: refused even with --overwrite
    rc, _, err = _export(capsys, "--checkpoint", world / "run_seed2", "--out", out, "--overwrite")
    assert rc == 1 and "holds a release of another training run of this model" in err
    # another checkpoint of the same run: only with --overwrite
    step2 = world / "run" / "checkpoints" / "step_00000002"
    rc, _, err = _export(capsys, "--checkpoint", step2, "--out", out)
    assert rc == 1 and "already holds a release of this model (step 4 of" in err and "needs --overwrite" in err
    assert _sidecar(out)["source"]["step"] == 4
    assert _export(capsys, "--checkpoint", step2, "--out", out, "--overwrite")[0] == 0
    assert _sidecar(out)["source"]["step"] == 2


# --------------------------------------------------------------------------------------------
# Item 6: export --embed-ae / --tokenizer the CALM was not trained with
# --------------------------------------------------------------------------------------------
def test_export_refuses_an_autoencoder_or_tokenizer_the_calm_was_not_trained_with(world, tmp_path, capsys):
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.ae_io import autoencoder_fingerprint
    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizers import load_tokenizer

    right = autoencoder_fingerprint(load_autoencoder(world / "ae"))
    wrong = autoencoder_fingerprint(load_autoencoder(world / "other_ae"))
    state = json.loads((world / "run" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["data_sources"]["ae_fingerprint"] == right == load_manifest(world / "latents").ae_fingerprint
    assert state["config"]["model"]["ae_path"] is None  # recorded although the run loads no AE

    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "a", "--embed-ae",
                         world / "other_ae")
    assert rc == 1 and f"has fingerprint {wrong}" in err and f"fingerprint {right}" in err
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "b", "--tokenizer",
                         world / "other_tokenizer")
    tok_right, tok_wrong = (load_tokenizer(str(world / n)).fingerprint for n in ("tokenizer", "other_tokenizer"))
    assert rc == 1 and f"tokenizer {world / 'other_tokenizer'} has fingerprint {tok_wrong}" in err and tok_right in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    rc, _, _ = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "ok", "--embed-ae", world / "ae",
                       "--tokenizer", world / "tokenizer")
    assert rc == 0
    source = _sidecar(tmp_path / "ok")["source"]
    assert source["embedded_ae_fingerprint"] == right and source["data"]["tokenizer_fingerprint"] == tok_right


# --------------------------------------------------------------------------------------------
# Item 7: export falling back to an older checkpoint
# --------------------------------------------------------------------------------------------
def test_export_says_which_checkpoint_it_exports_and_warns_on_a_fallback(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    rc, out, err = _export(capsys, "--checkpoint", run, "--out", tmp_path / "newest")
    assert rc == 0 and "exported step 4 of" in out and "warning" not in err
    assert _sidecar(tmp_path / "newest")["source"]["fallback"] is None

    engine_file = next((run / "checkpoints" / "step_00000004" / "engine").iterdir())
    engine_file.write_bytes(engine_file.read_bytes()[:100])  # truncated
    rc, out, err = _export(capsys, "--checkpoint", run, "--out", tmp_path / "older")
    assert rc == 0 and "exported step 2 of" in out
    assert "warning: exporting" in err and "(step 2), not the newest checkpoint: step_00000004 is damaged" in err
    source = _sidecar(tmp_path / "older")["source"]
    assert source["step"] == 2 and source["checkpoint"].endswith("step_00000002")
    assert "step_00000004 is damaged" in source["fallback"]
    assert cli_main(["release-info", str(tmp_path / "older")]) == 0
    assert "exported from: step 2 of" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Item 10: a release whose config.json was edited
# --------------------------------------------------------------------------------------------
def _edit(path, **values):
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))


def test_an_edited_release_config_is_refused_naming_the_fields(world, tmp_path, capsys):
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.errors import DataError

    calm = tmp_path / "calm"
    assert _export(capsys, "--checkpoint", world / "run", "--out", calm)[0] == 0
    assert cli_main(["release-info", str(calm)]) == 0
    assert "as exported (fingerprint of config and weights): yes" in capsys.readouterr().out
    _edit(calm / "config.json", rope_theta=20000.0, rms_norm_eps=1e-3)  # shapes unchanged
    assert cli_main(["release-info", str(calm)]) == 1
    out = capsys.readouterr().out
    assert "names and shapes match the config: yes" in out
    assert "as exported (fingerprint of config and weights): NO" in out
    assert "config.json rms_norm_eps: 1e-06 -> 0.001" in out and "config.json rope_theta: 10000.0 -> 20000.0" in out
    with pytest.raises(ReleaseError, match=r"config.json rms_norm_eps: 1e-06 -> 0.001; config.json rope_theta"):
        import_release(calm)

    ae = tmp_path / "ae"
    shutil.copytree(world / "ae", ae)
    _edit(ae / "config.json", rms_norm_eps=1e-2)
    with pytest.raises(DataError, match=r"ae: differs from what was exported .*config.json rms_norm_eps: 1e-06 -> 0\.01"):
        load_autoencoder(ae)  # what calm-data encode and the trainer load
    weights = ae / "model.safetensors"
    shutil.copy(world / "other_ae" / "model.safetensors", weights)  # same names and shapes, other weights
    _edit(ae / "config.json", rms_norm_eps=1e-6)
    with pytest.raises(ReleaseError, match="weight file model.safetensors changed"):
        import_release(ae)

    # unknown fields are reported; the published layout (no fingerprint) loads, said to be unverified
    published = tmp_path / "published"
    shutil.copytree(world / "ae", published)
    (published / "calm_pretrain.json").unlink()
    _edit(published / "config.json", sliding_window=64)
    with pytest.warns(ReleaseWarning) as caught:
        import_release(published)
    messages = [str(w.message) for w in caught]
    assert any("unverified: no fingerprint recorded" in m for m in messages)
    assert any("field(s) sliding_window are not read by calm_pretrain" in m for m in messages)
    assert cli_main(["release-info", str(published)]) == 0
    out = capsys.readouterr().out
    assert "unverified (no fingerprint recorded" in out
    assert "not read by calm_pretrain (no effect): sliding_window" in out


# --------------------------------------------------------------------------------------------
# A kill during export
# --------------------------------------------------------------------------------------------
KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from calm_pretrain.models import build_model
    from calm_pretrain.release import directory, export_release
    from tests.helpers.models import tiny_ae_config

    where = sys.argv[2]
    real_replace = os.replace
    def replace(src, dst):  # the kill comes at `where`: while writing, or between the two renames
        real_replace(src, dst)
        if where == "between-renames":
            os.kill(os.getpid(), signal.SIGKILL)
    directory.os.replace = replace
    if where == "writing":
        import safetensors.torch
        safetensors.torch.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    torch.manual_seed(3)
    ae = build_model(tiny_ae_config(vocab_size=300, latent_dim=16, hidden_size=32, intermediate_size=48))
    export_release(ae, sys.argv[1], overwrite=True)
""")


def test_a_killed_export_leaves_no_temporary_directory_behind_the_next_export(world, tmp_path):
    out = tmp_path / "ae"
    shutil.copytree(world / "ae", out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for where in ("writing", "between-renames"):
        killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), where], env=env)
        assert killed.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".ae.tmp-") for n in left) and any(n.startswith(".ae.old-") for n in left)
    assert not out.exists()  # killed between moving the previous release aside and moving the new one in

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_release(import_release(world / "ae")[0], tmp_path / "ae", overwrite=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "restored the previous release from .ae.old-" in messages and "removed .ae.tmp-" in messages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]
    assert _files(out)["model.safetensors"] == (world / "ae" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------------------------
# Unclear errors made clear: configs and the data pipeline
# --------------------------------------------------------------------------------------------
def test_an_empty_or_model_less_config_is_refused_instead_of_training_calm_m(tmp_path, capsys):
    for name, text in (("empty.yaml", ""), ("no_model.yaml", f"train:\n  output_dir: {tmp_path / 'run'}\n")):
        (tmp_path / name).write_text(text)
        assert cli_main(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"config error: {tmp_path / name}: model.arch: missing" in err
        assert "autoencoder | calm | transformer" in err
    assert not (tmp_path / "run").exists()


def test_an_edited_manifest_k_or_latent_dim_is_one_clear_error_and_verify_reports_it(world, tmp_path, capsys):
    from data_pipeline.cli import main as data_main

    latents = tmp_path / "latents"
    shutil.copytree(world / "latents", latents)
    manifest = json.loads((latents / "manifest.json").read_text())
    manifest["latent"]["latent_dim"] = 32
    (latents / "manifest.json").write_text(json.dumps(manifest))
    cfg = tmp_path / "calm.yaml"
    cfg.write_text((REPO / "configs/tiny/calm.yaml").read_text())
    assert cli_main(["train", "--config", str(cfg), *CALM_SMALL, "model.latent_dim=32", f"data.train=[{latents}]",
                     f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert f"{latents / 'manifest.json'}: does not match its shard" in err
    assert "latent.latent_dim = 32 in the manifest, 16 in the shard" in err and "Traceback" not in err

    manifest["latent"]["latent_dim"], manifest["k"] = 16, 8
    (latents / "manifest.json").write_text(json.dumps(manifest))
    assert data_main(["verify", str(latents)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED latents-00000.arrow: does not match the manifest (k = 8 in the manifest, 4 in the shard)" in out


def test_a_model_vocabulary_smaller_than_the_shards_ids_is_refused_at_start_up(world, tmp_path, capsys):
    cfg = tmp_path / "calm.yaml"
    cfg.write_text((REPO / "configs/tiny/calm.yaml").read_text())
    assert cli_main(["train", "--config", str(cfg), *CALM_SMALL, "model.vocab_size=40",
                     f"data.train=[{world / 'latents'}]", f"train.output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"{world / 'latents' / 'manifest.json'}: the shards hold token ids up to 63" in err
    assert "model's vocabulary has 40 entries" in err and "IndexError" not in err


def test_a_mistyped_local_path_or_tokenizer_directory_is_reported_missing(world, tmp_path, capsys):
    import time

    from data_pipeline.cli import main as data_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the release layout\n")
    t0 = time.perf_counter()
    for mistyped in ("corpus/wiki/train", "data/corpus.jsonl.gz", str(tmp_path / "corpsu")):
        assert data_main(["tokenize", mistyped, "-o", str(tmp_path / "out"), "--tokenizer",
                          str(world / "tokenizer")]) == 2
        assert f"input {mistyped!r} does not exist (no such file or directory" in capsys.readouterr().err
    missing_tok = tmp_path / "tokenizers" / "mine"
    assert data_main(["tokenize", str(corpus), "-o", str(tmp_path / "out"), "--tokenizer", str(missing_tok)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load tokenizer {str(missing_tok)!r}: no such directory" in err and "Repo id" not in err
    assert time.perf_counter() - t0 < 10  # no hub lookups and retries


def test_a_failed_tokenize_does_not_lock_its_output_directory(world, tmp_path, capsys):
    from data_pipeline.cli import main as data_main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i} of the corpus"}) + "\n" for i in range(50)))
    argv = ["tokenize", str(corpus), "-o", str(tmp_path / "out"), "--tokenizer", str(world / "tokenizer"),
            "--k", "4", "--seq-chunks", "2", "-j", "0", "--no-progress"]
    assert data_main(argv) == 2  # no "text" field
    assert "text" in capsys.readouterr().err and (tmp_path / "out" / "job.json").is_file()
    assert data_main([*argv, "--text-field", "body"]) == 0  # the corrected job is not "a different job"
    assert (tmp_path / "out" / "manifest.json").is_file()


# The peak RSS of a tokenize run, from getrusage(RUSAGE_CHILDREN) of a small parent: a process's own
# ru_maxrss starts at its parent's RSS when forked (pytest's here), which would hide the measurement.
MEASURE_TOKENIZE = textwrap.dedent("""
    import resource, subprocess, sys
    job = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "tokenize", sys.argv[1], "-o", sys.argv[2],
                          "--tokenizer", sys.argv[3], "--text-unit", "line", "--k", "4", "--seq-chunks", "8", "-j", "0",
                          "--no-progress"])
    print(job.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # Linux: KiB
""")


def test_a_long_single_line_document_takes_memory_bounded_by_its_ids(world, tmp_path):
    # Letters the tiny tokenizer has few merges for: about one token per byte, the costly case.
    line = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz     "), 5_000_000))
    (tmp_path / "long.txt").write_text(line + "\n")
    (tmp_path / "short.txt").write_text(line[:50_000] + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    peak = {}
    for name in ("short", "long"):
        run = subprocess.run([sys.executable, "-c", MEASURE_TOKENIZE, str(tmp_path / f"{name}.txt"),
                              str(tmp_path / name), str(world / "tokenizer")], env=env, capture_output=True, text=True)
        rc, peak[name] = map(int, run.stdout.split()[-2:])
        assert rc == 0, run.stderr
    per_byte = (peak["long"] - peak["short"]) / len(line)
    # ~22 bytes a token now (ids, packed samples, shard buffers); it was ~84, growing with the document
    assert per_byte < 30, f"{per_byte:.1f} bytes of memory per byte of text"


KILLED_TOKENIZE = textwrap.dedent("""
    import sys
    from data_pipeline.cli import main
    sys.exit(main(["tokenize", sys.argv[1], "-o", sys.argv[2], "--tokenizer", sys.argv[3], "--shard-text-mb", "0.02",
                   "--text-unit", "paragraph",
                   "--k", "4", "--seq-chunks", "8", "-j", "2", "--no-progress"]))
""")


def test_a_killed_tokenize_leaves_no_worker_processes(world, tmp_path):
    import signal
    import time

    import psutil

    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} " + "of the release layout " * 400
                                                     for i in range(400)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    main = subprocess.Popen([sys.executable, "-c", KILLED_TOKENIZE, str(tmp_path / "corpus.txt"),
                             str(tmp_path / "out"), str(world / "tokenizer")], env=env)
    workers = []
    deadline = time.time() + 60
    while len(workers) < 2 and time.time() < deadline and main.poll() is None:
        time.sleep(0.2)
        workers = [p for p in psutil.Process(main.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2 and main.poll() is None, "the job ended before its workers were seen"
    os.kill(main.pid, signal.SIGKILL)
    main.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} worker(s) outlived the killed job"
