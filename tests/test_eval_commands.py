"""`calm-pretrain eval` and `calm-pretrain generate` on small releases made here: the numbers against an
independent computation, the published layout with a foreign ae_path scored with --ae, bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from calm_pretrain.cli import main as cli_main
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.transformer import TransformerConfig
from calm_pretrain.models import build_model
from calm_pretrain.release import export_release
from tests.helpers.models import perturbed, tiny_bpe

V = 300
TEXT = ("The module provides functions for working with paths. The release layout of the published "
        "checkpoints keeps every tensor name. Each line is one document of the eval set.")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe([TEXT] * 20, V)


COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("releases")
    ae = perturbed(build_model(AutoencoderConfig(k=4, latent_dim=8, vocab_size=V, hidden_size=32, intermediate_size=48,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)))
    calm = perturbed(build_model(CALMConfig(**COMMON, k=4, latent_dim=8, head=HeadConfig(noise_size=8, num_blocks=1))))
    tr = perturbed(build_model(TransformerConfig(**COMMON)))
    export_release(ae, root / "ae", tokenizer)
    export_release(calm, root / "calm", tokenizer)  # no AE embedded: the published convention
    export_release(tr, root / "transformer", tokenizer)
    cfg_path = root / "calm" / "config.json"  # the published releases name the authors' machine
    cfg = json.loads(cfg_path.read_text())
    cfg["ae_path"] = "/nonexistent/authors/machine/calm_autoencoder"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    (root / "calm" / "calm_pretrain.json").unlink()  # the published layout: config.json and weights only
    evalset = root / "eval.jsonl"
    evalset.write_text("".join(json.dumps({"text": TEXT + f" Document {i}."}) + "\n" for i in range(12)))
    return {"root": root, "tr": tr, "evalset": evalset}


def _eval(args, tmp_path):
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", *map(str, args), "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.is_file() else None)


def test_transformer_brier_1_equals_the_exact_softmax_score(releases, tokenizer, tmp_path):
    rc, result = _eval([releases["root"] / "transformer", "--data", releases["evalset"], "--block-tokens", 32],
                       tmp_path)
    assert rc == 0
    from data_pipeline.evalset import eval_blocks

    blocks = eval_blocks(str(releases["evalset"]), tokenizer, 32)
    assert result["eval_set"]["blocks"] == len(blocks) > 2 and result["eval_set"]["block_tokens"] == 32
    with torch.no_grad():  # 2·p(y) − Σ p² at every position, from the model's exact probabilities
        scores = []
        for b in blocks:
            p = F.softmax(releases["tr"].logits(b)[0, :-1].double(), -1)
            scores.append(2 * p.gather(-1, b[0, 1:, None]).squeeze(-1) - p.square().sum(-1))
    exact = torch.cat(scores)
    s = result["scores"]
    assert s["brier_1"] == pytest.approx(float(exact.mean()), rel=1e-6)
    assert abs(s["brier_1"] - float(exact.mean())) <= s["brier_1_se"]
    again = _eval([releases["root"] / "transformer", "--data", releases["evalset"], "--block-tokens", 32], tmp_path)[1]
    assert again["scores"] == s  # same seed, same numbers


def test_a_published_layout_calm_needs_and_takes_its_autoencoder(releases, tmp_path, capsys):
    calm, ae = releases["root"] / "calm", releases["root"] / "ae"
    rc, _ = _eval([calm, "--data", releases["evalset"], "--block-tokens", 32], tmp_path)
    assert rc == 2 and "pass --ae" in capsys.readouterr().err
    rc, result = _eval([calm, "--ae", ae, "--data", releases["evalset"], "--block-tokens", 32, "--seed", 3], tmp_path)
    assert rc == 0
    s = result["scores"]
    for key in ("brierlm", "brier_4_se", "energy_skill", "energy_skill_se", "token_accuracy", "marginal_energy_score"):
        assert key in s
    assert result["seed"] == 3 and result["eval_set"]["ids_fingerprint"]
    rc = cli_main(["generate", str(calm), "--ae", str(ae), "--prompt", "The module", "--max-new-tokens", "8",
                   "--temperature", "0.5", "--candidates", "16"])
    out = capsys.readouterr()
    assert rc == 0 and "### The module" in out.out and "backbone steps per generated token" in out.err
    rc = cli_main(["generate", str(calm), "--ae", str(ae), "--prompt", "The module", "--max-new-tokens", "4",
                   "--temperature", "0.7", "--sampler", "exact"])
    assert rc == 0
    capsys.readouterr()
    rc = cli_main(["generate", str(calm), "--ae", str(ae), "--prompt", "The module", "--max-new-tokens", "8",
                   "--temperature", "0.5", "--candidates", "16", "--head-dtype", "bf16"])
    assert rc == 0 and "### The module" in capsys.readouterr().out


def test_autoencoder_reconstruction_curve(releases, tmp_path):
    rc, result = _eval([releases["root"] / "ae", "--data", releases["evalset"], "--block-tokens", 32], tmp_path)
    assert rc == 0
    s = result["scores"]
    assert {"accuracy", "accuracy_noise_0.1", "accuracy_noise_0.5"} <= set(s)


@pytest.mark.parametrize("args, message", [
    (["--block-tokens", "30"], "not a multiple of the model's K = 4"),
    (["--block-tokens", "4096"], "yields no full block of 4096 tokens"),
])
def test_bad_eval_input_is_one_clear_error(releases, tmp_path, capsys, args, message):
    rc, _ = _eval([releases["root"] / "calm", "--ae", releases["root"] / "ae", "--data", releases["evalset"], *args],
                  tmp_path)
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "The", "--temperature", "1.5"], "needs T in (0, 1]"),
])
def test_bad_generate_input_is_one_clear_error(releases, capsys, args, message):
    rc = cli_main(["generate", str(releases["root"] / "calm"), "--ae", str(releases["root"] / "ae"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_head_dtype_is_refused_for_a_transformer(releases, capsys):
    rc = cli_main(["generate", str(releases["root"] / "transformer"), "--prompt", "The", "--head-dtype", "bf16"])
    assert rc == 2 and "a transformer model has no generative head" in capsys.readouterr().err


def test_export_writes_a_model_card_with_the_eval_results(releases, tmp_path):
    from calm_pretrain.release import export_state_dict

    rc, result = _eval([releases["root"] / "transformer", "--data", releases["evalset"], "--block-tokens", 32],
                       tmp_path)
    assert rc == 0
    model = releases["tr"]
    out = export_state_dict(model.state_dict(), model.config, tmp_path / "carded", eval_result=result)
    card = (out / "README.md").read_text()
    assert "# transformer release" in card and "| layers | 1 |" in card
    total = sum(p.numel() for p in model.parameters())  # the card's count against the module's own tensors
    assert f"| total | {total:,} |" in card
    assert f"| brier_1 | {result['scores']['brier_1']:.4f} |" in card
    assert result["eval_set"]["ids_fingerprint"] in card and "calm-pretrain generate ." in card
    plain = (releases["root"] / "calm" / "README.md").read_text()  # exported without an eval: says how to add one
    assert "Not evaluated at export" in plain and "pass --ae DIR" in plain


def test_release_info_finds_checks_and_reports_the_autoencoder(releases, tmp_path, capsys):
    calm, ae = releases["root"] / "calm", releases["root"] / "ae"
    assert cli_main(["release-info", str(calm)]) == 0
    assert "autoencoder: NOT FOUND: not embedded and its ae_path '/nonexistent/" in capsys.readouterr().out
    assert cli_main(["release-info", str(calm), "--ae", str(ae)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "autoencoder:" in x][0]
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    n = sum(p.numel() for p in build_model(AutoencoderConfig(k=4, latent_dim=8, vocab_size=V, hidden_size=32,
                                                             intermediate_size=48, **ids)).parameters())
    assert f"--ae {ae}: K=4, latent 8, {n / 1e6:.2f}M parameters; fits" in line
    other = perturbed(build_model(AutoencoderConfig(k=2, latent_dim=8, vocab_size=V, hidden_size=32,
                                                    intermediate_size=48, **ids)))
    export_release(other, tmp_path / "ae_k2")
    assert cli_main(["release-info", str(calm), "--ae", str(tmp_path / "ae_k2")]) == 2
    assert "the autoencoder has K=2, latent 8; the CALM" in capsys.readouterr().err
    assert cli_main(["release-info", str(releases["root"] / "transformer"), "--ae", str(ae)]) == 2
    assert "--ae applies to CALM releases" in capsys.readouterr().err


def test_generate_batches_prompts_and_matches_unbatched_greedy_decoding(releases, tokenizer, capsys):
    words = TEXT.split()
    by_length: dict[int, list[str]] = {}
    for i in range(len(words) - 1):
        by_length.setdefault(len(tokenizer.encode(" ".join(words[i:i + 2]))), []).append(" ".join(words[i:i + 2]))
    pair = next(v for v in by_length.values() if len(v) >= 2)[:2]  # two prompts of one length share a batch
    prompts = [*pair, next(v[0] for v in by_length.values() if v[0] not in pair)]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    model = releases["tr"]
    expected = []
    with torch.no_grad():  # greedy decoding, one prompt at a time, the whole sequence re-read every step
        for p in prompts:
            ids = tokenizer.encode(p)
            for _ in range(6):
                nxt = int(model.logits(torch.tensor([ids]))[0, -1].argmax())
                ids.append(nxt)
                if nxt == model.config.eos_token_id:
                    break
            expected.append(tokenizer.decode([t for t in ids if t != model.config.pad_token_id]))
    args = ["generate", str(releases["root"] / "transformer"), "--max-new-tokens", "6", "--temperature", "0"]
    assert cli_main([*args, *(x for p in prompts for x in ("--prompt", p))]) == 0
    out = capsys.readouterr()
    texts = [line[len("[0] "):] for line in out.out.splitlines() if line.startswith("[0] ")]
    assert texts == expected
    assert f"3 continuations in {len(set(lengths))} batches" in out.err


def test_generate_samples_a_calm_in_batches_of_the_requested_size(releases, capsys):
    args = ["generate", str(releases["root"] / "calm"), "--ae", str(releases["root"] / "ae"), "--prompt",
            "The module", "--max-new-tokens", "8", "--temperature", "1", "--num-samples", "4", "--seed", "1"]
    assert cli_main([*args, "--batch-size", "4"]) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line[:1] == "["]
    assert [r[:4] for r in rows] == ["[0] ", "[1] ", "[2] ", "[3] "] and all("The module" in r for r in rows)
    assert len(set(rows)) > 1, "four draws at T = 1 were all the same"
    assert "4 continuations in 1 batches" in out.err
    assert cli_main([*args, "--batch-size", "3"]) == 0
    assert "4 continuations in 2 batches" in capsys.readouterr().err


def test_a_run_continues_from_a_published_calm_release_given_its_autoencoder(releases, tmp_path, capsys):
    import numpy as np

    from calm_pretrain.release.autoencoder import load_autoencoder

    from data_pipeline.ae_io import autoencoder_fingerprint
    from tests.helpers.data import write_latent_dataset

    calm, ae_dir = releases["root"] / "calm", releases["root"] / "ae"
    rng = np.random.default_rng(0)
    n, chunks = 8, 8
    ids, mu = rng.integers(3, V, (n, chunks * 4)), rng.standard_normal((n, chunks, 8)).astype(np.float32)
    log_sigma = np.full((n, chunks, 8), -2.0, np.float32)
    write_latent_dataset(tmp_path / "latents", ids, mu, log_sigma, k=4, vocab_size=V,
                         ae_fingerprint=autoencoder_fingerprint(load_autoencoder(ae_dir)))
    write_latent_dataset(tmp_path / "other", ids, mu, log_sigma, k=4, vocab_size=V, ae_fingerprint="0123456789abcdef")
    model = [f"model.{k}={v}" for k, v in COMMON.items()]
    base = ["train", "model.arch=calm", *model, "model.k=4", "model.latent_dim=8", "model.head.noise_size=8",
            "model.head.num_blocks=1", "data.seq_chunks=8", "train.max_steps=1", "train.micro_batch_size=2",
            "train.lr=1e-9", "train.warmup_steps=0", "train.wandb=off", f"train.init_from={calm}"]
    assert cli_main([*base, f"data.train=[{tmp_path / 'latents'}]", f"train.output_dir={tmp_path / 'run0'}"]) == 2
    assert "neither embeds nor records its autoencoder" in capsys.readouterr().err
    assert cli_main(["train", "--ae", str(ae_dir), *base[1:], f"data.train=[{tmp_path / 'other'}]",
                     f"train.output_dir={tmp_path / 'run1'}"]) != 0
    assert "0123456789abcdef' but the run's config has autoencoder fingerprint" in capsys.readouterr().err
    run = tmp_path / "run2"
    assert cli_main(["train", "--ae", str(ae_dir), *base[1:], f"data.train=[{tmp_path / 'latents'}]",
                     f"train.output_dir={run}"]) == 0
    from calm_pretrain.release import import_release
    from calm_pretrain.train.checkpoint import consolidated_state_dict

    trained, _ = consolidated_state_dict(run)
    for name, p in import_release(calm)[0].state_dict().items():  # one step at lr 1e-9: the release's weights
        torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-6)


def test_eval_refuses_a_misfit_autoencoder_and_a_release_whose_config_and_weights_disagree(releases, tmp_path,
                                                                                         capsys):
    import shutil

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    other = perturbed(build_model(AutoencoderConfig(k=4, latent_dim=16, vocab_size=V, hidden_size=32,
                                                    intermediate_size=48, **ids)))
    export_release(other, tmp_path / "ae_d16")
    rc, _ = _eval([releases["root"] / "calm", "--ae", tmp_path / "ae_d16", "--data", releases["evalset"]], tmp_path)
    assert rc == 2 and "the autoencoder has K=4, latent 16; the CALM needs K=4, latent 8" in capsys.readouterr().err
    bad = tmp_path / "transformer"
    shutil.copytree(releases["root"] / "transformer", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights hold 64
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, _ = _eval([bad, "--data", releases["evalset"], "--block-tokens", 32], tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "eval error" in err
