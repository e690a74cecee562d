"""The model card (README.md) that `calm-pretrain export` writes beside a release's weights."""
from __future__ import annotations

import dataclasses
from typing import Optional


def _rows(pairs) -> list[str]:
    return ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in pairs if v is not None]


def _architecture(cfg) -> list[tuple]:
    """The architecture table: the architecture and vocabulary, then its release adapter's rows."""
    from calm_pretrain.models import spec_of

    return [("architecture", cfg.arch), ("vocabulary", cfg.vocab_size), *spec_of(cfg).release.card_rows(cfg)]


def _scores(eval_result: dict) -> list[str]:
    s, e = eval_result.get("scores", {}), eval_result.get("eval_set", {})
    lines = [f"Measured with `calm-pretrain eval` on {', '.join(map(str, e.get('inputs', [])))}: {e.get('blocks')} "
             f"blocks of {e.get('block_tokens')} tokens (ids fingerprint {e.get('ids_fingerprint')}), seed "
             f"{eval_result.get('seed')}, protocol {eval_result.get('protocol')}. ± one standard error.", "",
             "| score | value | ± s.e. |", "|---|---|---|"]
    for key in ("brierlm", "brier_1", "brier_2", "brier_3", "brier_4", "energy_skill", "token_accuracy", "accuracy"):
        if key in s:
            se = s.get(f"{key}_se")
            lines.append(f"| {key} | {s[key]:.4f} | {'' if se is None else f'{se:.4f}'} |")
    return lines


def model_card(cfg, parameters: dict, source: Optional[dict], ae_fingerprint: Optional[str],
               eval_result: Optional[dict] = None) -> str:
    """Markdown: architecture and sizes, parameter counts, the AE, training, eval results, how to load."""
    from calm_pretrain.models import spec_of

    spec = spec_of(cfg)
    lines = [f"# {cfg.arch} release (calm-pretrain)", "", "## Architecture", "", *_rows(_architecture(cfg)), "",
             "## Parameters", "", "| component | parameters |", "|---|---|"]
    lines += [f"| {name} | {n:,} |" for name, n in parameters.items()]
    if spec.uses_autoencoder:
        lines += ["", "## Autoencoder", "",
                  f"Frozen autoencoder fingerprint: `{ae_fingerprint or 'unknown'}` "
                  f"({'embedded as ae_model.*' if ae_fingerprint and source and source.get('embedded_ae_fingerprint') else 'not embedded: pass --ae DIR to eval and generate'})."]
    if source:
        lines += ["", "## Training", "", *_rows([("checkpoint", f"`{source.get('checkpoint')}`"),
                                                   ("steps", source.get("step")), ("tokens", source.get("tokens")),
                                                   ("run fingerprint", source.get("run_fingerprint"))])]
    lines += ["", "## Evaluation", ""]
    lines += _scores(eval_result) if eval_result else ["Not evaluated at export (`calm-pretrain export --eval-json "
                                                      "FILE` records the output of `calm-pretrain eval --json FILE`)."]
    lines += ["", "## How to load", "", "```bash", "calm-pretrain release-info .",
              "calm-pretrain eval . --data heldout.jsonl" + (" [--ae AE_DIR]" if spec.uses_autoencoder else ""),
              *(['calm-pretrain generate . --prompt "Once upon a time"'] if spec.generate is not None else []),
              "```", "", "```python", "from calm_pretrain.release import import_release",
              "model, config = import_release(\".\")", "```",
              "", f"Config: {len(dataclasses.asdict(cfg))} fields in `calm_pretrain.json` (ours) and `config.json` "
              "(the published layout).", ""]
    return "\n".join(lines)
