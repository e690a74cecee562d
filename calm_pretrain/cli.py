"""`calm-pretrain` command line: one subcommand per job; each takes --config and dotted overrides."""
from __future__ import annotations

import argparse
import sys
import warnings

from calm_pretrain.config import ConfigError, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.k=8 train.lr=1e-4")


def cmd_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_params(args) -> int:
    from calm_pretrain.models import count_config_parameters

    cfg = load_config(args.config, args.overrides)
    counts = count_config_parameters(cfg.model)
    print(f"{cfg.name} ({cfg.model.arch})")
    for name, n in counts.items():
        print(f"  {name:<24} {n:>15,}  ({n / 1e6:8.1f}M)")
    return 0


def cmd_demo(args) -> int:
    from calm_pretrain.demo import run_demo

    from calm_pretrain.demo import CommandFailed, SettingsChanged

    try:
        run_demo(args.run_dir, config=args.config, overrides=args.overrides, steps_scale=args.steps_scale)
    except (CommandFailed, SettingsChanged) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from calm_pretrain.train_command import run_training

    overrides = list(args.overrides)
    if args.exit_after_minutes is not None:
        overrides.append(f"train.exit_after_minutes={args.exit_after_minutes}")
    if args.ae:
        overrides.append(f"model.ae_path={args.ae}")
    return run_training(load_config(args.config, overrides))


def cmd_release_info(args) -> int:
    import json

    from calm_pretrain.release import ReleaseError, release_info

    try:
        info = release_info(args.dir, args.ae)
    except ReleaseError as e:
        print(f"release error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    w = info["weights"]
    print(f"release {info['path']}: {info['architecture']} ({info['model_config']['arch']})")
    print(f"  weights: {', '.join(w['files'])} ({w['format']}, {w['tensors']} tensors, {w['bytes'] / 1e6:,.1f} MB, "
          f"{'/'.join(w['dtypes'])})")
    print("  parameters (unique):")
    for name, n in info["parameters"].items():
        print(f"    {name:<24} {n:>15,}  ({n / 1e6:8.1f}M)")
    if info["embedded_ae_parameters"] is not None:
        n = info["embedded_ae_parameters"]
        print(f"    {'embedded autoencoder':<24} {n:>15,}  ({n / 1e6:8.1f}M, ae_model.*)")
    print(f"  tokenizer: {', '.join(info['tokenizer']) or 'none'}")
    if "autoencoder" in info:
        print("  autoencoder: " + _describe_autoencoder(info["autoencoder"]))
    print("  names and shapes match the config: " + ("yes" if info["shapes_match"] else f"NO: {info['problem']}"))
    fp = info["fingerprint"]
    print("  as exported (fingerprint of config and weights): " + {
        "verified": f"yes ({len(w['files'])} weight file(s) hashed)", "mismatch": f"NO: {fp.get('message')}",
        "unverified": "unverified (no fingerprint recorded: the published layout or an older export)"}[fp["status"]])
    if fp["unknown_fields"]:
        print(f"  config.json fields not read by calm_pretrain (no effect): {', '.join(fp['unknown_fields'])}")
    if info["source"]:
        src = info["source"]
        print(f"  exported from: step {src.get('step')} of {src.get('checkpoint')}"
              + (f" (FALLBACK: {src['fallback']})" if src.get("fallback") else ""))
    print("  config.json:")
    for key, value in info["config"].items():
        print(f"    {key}: {json.dumps(value)}")
    return 0 if info["consistent"] else 1


def _describe_autoencoder(ae: dict) -> str:
    if ae["source"] is None:
        return f"NOT FOUND: {ae['problem']}"
    where = {"--ae": f"--ae {ae['path']}", "ae_path": f"ae_path {ae['path']}", "embedded": "embedded (ae_model.*)"}
    size = f", {ae['parameters'] / 1e6:.2f}M parameters" if ae.get("parameters") else ""
    return f"{where[ae['source']]}: K={ae['k']}, latent {ae['latent_dim']}{size}; fits this CALM"


def cmd_export(args) -> int:
    from calm_pretrain.release.from_checkpoint import export_checkpoint

    eval_result = None
    if args.eval_json:
        import json

        try:
            eval_result = json.loads(open(args.eval_json).read())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--eval-json {args.eval_json}: not a readable `calm-pretrain eval --json` file ({e})")
    out, source = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, embed_ae=args.embed_ae,
                                    overwrite=args.overwrite, eval_result=eval_result)
    print(f"exported step {source['step']} of {source['checkpoint']} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-pretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in [
        ("config", cmd_config, "print the resolved config"),
        ("params", cmd_params, "print parameter counts by component (no weights allocated)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.set_defaults(func=fn)
    p = sub.add_parser("train", help="train the autoencoder, CALM or the Transformer (torchrun/srun for DeepSpeed); "
                       "resumes from the run directory's newest intact checkpoint; exit 75 = saved, requeue me")
    _add_config_args(p)
    p.add_argument("--exit-after-minutes", type=float, default=None,
                   help="save and exit with the requeue code after this wall-clock budget")
    p.add_argument("--ae", help="CALM: the frozen autoencoder directory (model.ae_path), e.g. the one a published "
                   "release given as train.init_from was trained with")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("launch", add_help=False,
                       help="torchrun that keeps the requeue code 75 and relays SIGTERM/SIGUSR1 to the workers: "
                       "calm-pretrain launch [torchrun options] -- train --config CONFIG")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("export", help="consolidate a training checkpoint (any ZeRO stage) into a release directory")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (its newest intact checkpoint)")
    p.add_argument("--out", required=True, help="release directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer to save beside the weights (demo, llama3, or a directory)")
    p.add_argument("--embed-ae", help="for CALM: an autoencoder release to embed under ae_model.* (the one its "
                   "latents were encoded with)")
    p.add_argument("--eval-json", help="the output of `calm-pretrain eval --json` to record in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing release of the same run "
                   "(a release of another model is never replaced)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("demo", help="the main job: corpus → tokenizer → AE → latents → CALM + baseline → BrierLM, "
                       "samples, release checkpoints")
    p.add_argument("--config", help="pipeline config (default configs/demo.yaml: the embedded CPU demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: pipeline keys (tokenizer.vocab_size=512, "
                   "stages.calm.processes=1) or a stage's run config (ae.train.max_steps=800)")
    p.add_argument("--run-dir", default="runs/demo", help="outputs; finished stages are reused on a re-run")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps")
    p.set_defaults(func=cmd_demo)
    from calm_pretrain.eval.commands import add_eval_arguments, add_generate_arguments, cmd_eval, cmd_generate

    p = sub.add_parser("eval", help="score a release, run or checkpoint on an eval set: BrierLM, Brier-1..4, "
                       "CALM's energy skill, AE reconstruction, each with its standard error")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="sample text from a CALM (likelihood-free temperature sampling) or a "
                       "Transformer release, run or checkpoint")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("release-info", help="print the config and parameter count of a release directory")
    p.add_argument("dir", help="release directory (config.json + model.safetensors or pytorch_model.bin)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--ae", help="CALM: the autoencoder directory to check against it (when none is embedded)")
    p.set_defaults(func=cmd_release_info)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (ReleaseWarning, ...) as one line on stderr; others as Python prints them."""
    if issubclass(category, UserWarning) and type(message).__module__.startswith(("calm_pretrain", "data_pipeline")):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # its options are torchrun's: not parsed here
        from calm_pretrain.train.launcher import main as launch_main

        try:
            return launch_main(argv[1:])
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        from calm_pretrain.models.release_layout import ReleaseWarning

        warnings.simplefilter("always", ReleaseWarning)  # each one is about a different file or step
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the errors that name a bad file or input get one line, not a traceback
        from calm_pretrain.release import ReleaseError
        from calm_pretrain.train.checkpoint import CheckpointError
        from calm_pretrain.train.divergence import TrainingDiverged
        from data_pipeline.errors import DataError

        if isinstance(e, (CheckpointError, ReleaseError, DataError, TrainingDiverged)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
