"""`calm-pretrain eval` and `calm-pretrain generate` on small releases made here: the numbers against an
independent computation, the published layout with a foreign ae_path scored with --ae, bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from calm_pretrain.cli import main as cli_main
from calm_pretrain.config import AutoencoderConfig, CALMConfig, HeadConfig, TransformerConfig
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
