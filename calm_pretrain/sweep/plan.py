"""Planning: a sweep file (the format: calm_pretrain/sweep/cli.py, docs/sweeps.md) → a plan directory
with one resolved run config per point, the autoencoder stages a missing release needs, plan.json and
submit.sh (calm_pretrain/sweep/submit.py)."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from calm_pretrain.config import ConfigError, dump_config, load_config, RunConfig
from calm_pretrain.models import spec_of
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.sweep.errors import SweepError
from calm_pretrain.sweep.submit import REPO, write_submit
from data_pipeline.files import atomic_write_json

SWEEP_KEYS = {"base", "grid", "variants", "sizes", "overrides", "baselines", "autoencoders", "data", "launch", "runs",
              "name"}


def _path(value: str, root: Path) -> Path:
    """A path from a sweep file: absolute, else relative to the working directory if it exists
    there, else to the repository root (sweep files name configs as configs/...)."""
    p = Path(value)
    if p.is_absolute():
        return p
    for candidate in (Path.cwd() / p, root / p):
        if candidate.exists():
            return candidate.resolve()
    return (Path.cwd() / p).resolve()


def _fmt(template: Optional[str], **values) -> Optional[str]:
    return None if template is None else str(template).format(**values)


def _label(key: str, value: Any) -> str:
    if key in ("size", "variant"):
        return str(value)
    if key == "model.k":
        return f"k{value}"
    return f"{key.split('.')[-1]}-{value}"


def _overrides(mapping: Optional[dict]) -> list[str]:
    """{dotted: value} → ["dotted=<value as YAML>"] (lists and strings survive the round trip)."""
    out = []
    for key, value in (mapping or {}).items():
        out.append(f"{key}={json.dumps(value)}")  # JSON is YAML: strings, lists and numbers round-trip
    return out


def _points_of(section: dict, sizes: dict, where: str) -> list[tuple[dict, list[str]]]:
    """[(grid values of the point, overrides)] for one {base, grid, overrides} section."""
    grid = section.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{where}.grid: expected a mapping of key → list of values")
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise SweepError(f"{where}.grid.{key}: expected a non-empty list")
    # variants: named override sets, each applied alone to the base (a one-at-a-time study), crossed
    # with the grid; without variants, one unnamed variant with no overrides
    variants = section.get("variants") or {None: {}}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise SweepError(f"{where}.variants: expected a mapping of name → {{dotted key: value}}")
    out = []
    for variant, changes in variants.items():
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            ov = _overrides(section.get("overrides"))
            if "size" in values:
                if values["size"] not in sizes:
                    raise SweepError(f"{where}.grid.size: {values['size']!r} is not in sizes "
                                     f"({', '.join(sizes) or 'none'})")
                ov += _overrides(sizes[values["size"]])
            ov += _overrides({k: v for k, v in values.items() if k != "size"}) + _overrides(changes)
            out.append(({"variant": variant, **values} if variant is not None else values, ov))
    return out


def _flops(cfg: RunConfig, ae: Optional[AutoencoderConfig]) -> tuple[float, float]:
    from calm_pretrain.models.registry import inference_flops_per_token, training_flops_per_token

    context = cfg.data.seq_chunks
    train = training_flops_per_token(cfg.model, context, ae).total
    try:
        infer = inference_flops_per_token(cfg.model, context, ae).total
    except TypeError:  # the autoencoder has no generation cost of its own
        infer = 0.0
    return train, infer


def _params(cfg: RunConfig) -> int:
    from calm_pretrain.models import count_config_parameters

    return int(count_config_parameters(cfg.model)["total"])


def sample_tokens_of(cfg: RunConfig) -> int:
    return cfg.data.seq_chunks * cfg.model.tokens_per_position


def _chunk_k(m) -> Optional[int]:
    """K of a model that works in chunks of K tokens (CALM, its autoencoder); None for a token-level one."""
    spec = spec_of(m)
    chunked = spec.uses_autoencoder or spec.encodes_latents or m.tokens_per_position > 1
    return m.tokens_per_position if chunked else None


def _group(m) -> str:
    """A point's group in fits and plots: a model on an autoencoder's latents (the sweep's subject, CALM) by
    its K alone ("K=4"); another by its spec's label, with its K if it works in chunks ("AE K=4", "Transformer")."""
    spec, k = spec_of(m), _chunk_k(m)
    if spec.uses_autoencoder:
        return f"K={k}"
    return spec.display_name if k is None else f"{spec.display_name} K={k}"


def _entry(kind: str, name: str, cfg: RunConfig, config_path: Path, index: int, ae: Optional[AutoencoderConfig],
           world_size: int, size: Optional[str], grid: dict, depends: list[str]) -> dict:
    from calm_pretrain.models.calm.heads import evals_per_sample

    m = cfg.model
    per_token, infer = _flops(cfg, ae)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size * sample_tokens_of(cfg)
    tokens = tokens_per_step * cfg.train.max_steps
    head = getattr(m, "head", None)  # a CALM's generative head
    return {"name": name, "kind": kind, "arch": m.arch, "k": _chunk_k(m), "size": size, "group": _group(m),
            "grid": grid, "index": index, "config": str(config_path), "run_dir": cfg.train.output_dir, "params": _params(cfg),
            "context": cfg.data.seq_chunks, "sample_tokens": sample_tokens_of(cfg),
            "head": head.type if head else None, "evals_per_vector": evals_per_sample(head) if head else None,
            "training_flops_per_token": per_token, "inference_flops_per_token": infer,
            "ae_counted": ae is not None, "tokens_per_step": tokens_per_step, "max_steps": cfg.train.max_steps,
            "tokens": tokens, "training_flops": per_token * tokens, "depends_on": depends}


def _write_config(cfg: RunConfig, path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + dump_config(cfg))


def _latents_ready(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("complete", False)
    except (OSError, ValueError):
        return False


def _ae_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# make_plan and its steps
# --------------------------------------------------------------------------------------------
@dataclass
class _Sweep:
    """A sweep file's settings, resolved: what every step of planning reads."""
    path: Path
    tree: dict
    name: str
    runs: Path
    sizes: dict
    data: dict
    launch: dict
    world_size: int
    eval_dir: Optional[str]
    missing_inputs: list = field(default_factory=list)  # (K of the AE stage that needs it, or None; path)

    def tokens_of(self, k: int) -> Optional[str]:
        return str(_path(_fmt(self.data["tokens"], k=k), REPO)) if self.data.get("tokens") else None

    def load(self, base: str, ov: list[str], where: str) -> RunConfig:
        try:
            return load_config(_path(base, REPO), ov)
        except ConfigError as e:
            raise SweepError(f"{self.path} ({where}): {e}") from None


@dataclass
class _Autoencoders:
    """The frozen AE of every K the sweep lists, and the stages that make what is missing."""
    specs: dict[int, dict]
    cfgs: dict[int, RunConfig] = field(default_factory=dict)
    release: dict[int, Path] = field(default_factory=dict)
    latents: dict[int, Path] = field(default_factory=dict)
    stages: dict[str, list[dict]] = field(default_factory=lambda: {"ae": [], "export": [], "encode": []})


def _read_sweep(sweep_path: Path) -> dict:
    try:
        sweep = yaml.safe_load(sweep_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{sweep_path}: cannot read the sweep ({e})") from None
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{sweep_path}: unknown keys {sorted(unknown)} (known: {sorted(SWEEP_KEYS)})")
    if "base" not in sweep:
        raise SweepError(f"{sweep_path}: `base` (a run config) is required")
    return sweep


def _clear_plan_dir(out: Path, force: bool) -> None:
    if (out / "plan.json").exists() and not force:
        raise SweepError(f"{out} already holds a plan (plan.json): pass --force to replace it")
    for old in list((out / "configs").glob("[0-9][0-9][0-9][0-9].yaml")) + \
            list((out / "stages" / "ae" / "configs").glob("[0-9][0-9][0-9][0-9].yaml")):
        old.unlink()  # a smaller re-plan must not leave stale points for the job array


def _resolve(sweep_path: Path, sweep: dict) -> _Sweep:
    name = sweep.get("name") or sweep_path.stem
    data = sweep.get("data") or {}
    launch = sweep.get("launch") or {}
    return _Sweep(path=sweep_path, tree=sweep, name=name, runs=_path(sweep.get("runs") or f"runs/sweeps/{name}", REPO),
                  sizes=sweep.get("sizes") or {}, data=data, launch=launch,
                  world_size=int(launch.get("nodes", 1)) * int(launch.get("gpus_per_node", 1)),
                  eval_dir=str(_path(data["eval"], REPO)) if data.get("eval") else None)


def _autoencoder_stages(sw: _Sweep) -> _Autoencoders:
    """The AE of every K; an AE stage for each K with a missing release, an encode stage for missing latents."""
    aes = _Autoencoders({int(k): v or {} for k, v in (sw.tree.get("autoencoders") or {}).items()})
    data = sw.data
    for k, spec in sorted(aes.specs.items()):
        if "config" not in spec:
            raise SweepError(f"{sw.path}: autoencoders.{k}.config (the AE training config) is required")
        run_dir = sw.runs / f"ae-k{k}"
        ov = _overrides(spec.get("overrides")) + [f"model.k={k}", f"name={sw.name}-ae-k{k}",
                                                  f"train.output_dir={json.dumps(str(run_dir))}"]
        if data.get("ae_tokens"):
            ov.append(f"data.train={json.dumps([str(_path(_fmt(data['ae_tokens'], k=k), REPO))])}")
        cfg = sw.load(spec["config"], ov, f"autoencoders.{k}")
        if not spec_of(cfg.model).encodes_latents:
            raise SweepError(f"{sw.path}: autoencoders.{k}.config is a {cfg.model.arch} config, not an autoencoder")
        aes.cfgs[k] = cfg
        aes.release[k] = _path(spec["release"], REPO) if spec.get("release") else run_dir / "release"
        aes.latents[k] = _path(_fmt(data["latents"], k=k), REPO) if data.get("latents") else sw.runs / f"latents-k{k}"
        if not _ae_ready(aes.release[k]):
            if not cfg.data.train:
                raise SweepError(f"{sw.path}: the K={k} autoencoder must be trained but has no training shards "
                                 "(data.ae_tokens in the sweep, or data.train in its config)")
            for d in cfg.data.train:
                if not Path(d).exists():
                    sw.missing_inputs.append((k, str(d)))
            aes.stages["ae"].append({"k": k, "cfg": cfg, "release": aes.release[k]})
        if not _latents_ready(aes.latents[k]):
            if sw.tokens_of(k) is None:
                raise SweepError(f"{sw.path}: latents for K={k} must be encoded but data.tokens is not set")
            if not Path(sw.tokens_of(k)).exists():
                sw.missing_inputs.append((k, sw.tokens_of(k)))
            aes.stages["encode"].append({"k": k, "tokens": sw.tokens_of(k), "ae": aes.release[k],
                                         "out": aes.latents[k], "after_ae": not _ae_ready(aes.release[k])})
    return aes


def _point_inputs(sw: _Sweep, aes: _Autoencoders, section: dict, m) -> tuple[list[str], list[str], Any, Any]:
    """(overrides, stages it waits for, AE config counted in its FLOPs, ae_path) of one point's data."""
    extra, depends, ae, ae_path = [], [], None, getattr(m, "ae_path", None)
    on_latents, k = spec_of(m).uses_autoencoder, m.tokens_per_position
    if on_latents and k in aes.specs:
        ae = aes.cfgs[k].model
        ae_path = str(aes.release[k])
        extra += [f"model.latent_dim={ae.latent_dim}", f"data.train={json.dumps([str(aes.latents[k])])}"]
        if any(s["k"] == k for s in aes.stages["encode"]):
            depends.append(f"encode-k{k}")
    elif on_latents and m.ae_path:
        from calm_pretrain.release.autoencoder import load_autoencoder

        try:
            ae = load_autoencoder(m.ae_path).config
        except Exception:  # noqa: BLE001 - counted without the AE if it is not there yet
            ae = None
    fixed = section.get("overrides") or {}
    if not on_latents and sw.tokens_of(k) and "data.train" not in fixed:  # a model on token shards of its K
        extra.append(f"data.train={json.dumps([sw.tokens_of(k)])}")
        if not Path(sw.tokens_of(k)).exists():
            sw.missing_inputs.append((None, sw.tokens_of(k)))
    sample_tokens = sw.data.get("sample_tokens")
    if sample_tokens and "data.seq_chunks" not in fixed:
        if int(sample_tokens) % k:
            raise SweepError(f"{sw.path}: data.sample_tokens = {sample_tokens} is not a multiple of K = {k}")
        extra.append(f"data.seq_chunks={int(sample_tokens) // k}")
    if sw.eval_dir and (getattr(m, "ae_path", None) or not on_latents):  # a CALM run
        extra.append(f"data.eval={json.dumps(sw.eval_dir)}")  # scores with its AE; without, the eval stage
    return extra, depends, ae, ae_path


def _training_points(sw: _Sweep, aes: _Autoencoders, out: Path) -> tuple[list[dict], list[RunConfig]]:
    """The training points: the CALM grid, then the baselines; (plan entries, their run configs)."""
    points: list[dict] = []
    cfgs: list[RunConfig] = []
    sections = [("calm", sw.tree, "sweep")]
    if sw.tree.get("baselines"):
        sections.append(("baseline", sw.tree["baselines"], "baselines"))
    names: set[str] = set()
    for kind, section, where in sections:
        if "base" not in section:
            raise SweepError(f"{sw.path}: {where}.base is required")
        for values, ov in _points_of(section, sw.sizes, where):
            probe = sw.load(section["base"], ov, where)
            m = probe.model
            extra, depends, ae, ae_path = _point_inputs(sw, aes, section, m)
            label = "-".join(_label(key, v) for key, v in values.items())
            prefix = m.arch if "size" in values else probe.name  # a size grid: the base's size name would mislead
            name = f"{prefix}-{label}" if label else prefix
            if name in names:
                raise SweepError(f"{sw.path}: two points are both named {name!r}; vary the grid")
            names.add(name)
            extra += [f"name={name}", f"train.output_dir={json.dumps(str(sw.runs / name))}"]
            cfg = sw.load(section["base"], ov + extra, where)
            points.append(_entry(kind, name, cfg, out / "configs" / f"{len(points):04d}.yaml", len(points), ae,
                                 sw.world_size, values.get("size"), values, depends))
            points[-1]["ae_path"] = ae_path
            if values.get("variant") is not None:  # a one-at-a-time study: each variant is its own group
                points[-1]["group"] = points[-1]["variant"] = str(values["variant"])
            cfgs.append(cfg)
    if not points:
        raise SweepError(f"{sw.path}: the grid is empty")
    return points, cfgs


def _write_plan(sw: _Sweep, out: Path, points: list[dict], cfgs: list[RunConfig], stages: dict) -> dict:
    """The resolved configs of points and AE stages, plan.json and submit.sh; returns the plan."""
    for p, cfg in zip(points, cfgs):
        _write_config(cfg, Path(p["config"]), f"sweep {sw.name}, point {p['index']}: {p['name']} "
                      f"(generated by tools/sweep.py plan {sw.path})")
    ae_points = []
    for i, st in enumerate(stages["ae"]):
        cfg = st["cfg"]
        path = out / "stages" / "ae" / "configs" / f"{i:04d}.yaml"
        _write_config(cfg, path, f"sweep {sw.name}: autoencoder stage for K={st['k']}")
        e = _entry("ae", cfg.name, cfg, path, i, None, sw.world_size, None, {"model.k": st["k"]}, [])
        e["release"] = str(st["release"])
        ae_points.append(e)
    encode_stages = [{"name": f"encode-k{s['k']}", "k": s["k"], "tokens": s["tokens"], "ae": str(s["ae"]),
                      "output": str(s["out"]), "depends_on": ["export-ae"] if s["after_ae"] else []}
                     for s in stages["encode"]]
    plan = {
        "sweep": str(sw.path.resolve()), "name": sw.name, "plan_dir": str(out), "runs": str(sw.runs),
        "world_size": sw.world_size, "launch": {"nodes": int(sw.launch.get("nodes", 1)),
                                                "gpus_per_node": int(sw.launch.get("gpus_per_node", 1))},
        "flops_note": ("training FLOPs per token from calm_pretrain.flops.training_flops_per_token at context = "
                       "data.seq_chunks, CALM including the frozen AE encoder's forward per chunk; training_flops = "
                       "per token × planned tokens (max_steps × micro_batch × grad_accum × world_size × sample tokens)"),
        "points": points,
        "stages": {"ae": ae_points,
                   "export": ([{"name": "export-ae", "runs": [p["run_dir"] for p in ae_points],
                                "releases": [p["release"] for p in ae_points], "depends_on": ["ae"]}]
                              if ae_points else []),
                   "encode": encode_stages},
        "missing_inputs": sorted(set(path for _, path in sw.missing_inputs)),
        "eval": sw.eval_dir,
    }
    atomic_write_json(out / "plan.json", plan)
    write_submit(plan, out)
    return plan


def make_plan(sweep_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> dict:
    """Resolve a sweep file into a plan directory; returns the plan (also written as plan.json)."""
    sweep_path = Path(sweep_path)
    sweep = _read_sweep(sweep_path)
    out = Path(out).resolve()
    _clear_plan_dir(out, force)
    sw = _resolve(sweep_path, sweep)
    aes = _autoencoder_stages(sw)
    points, cfgs = _training_points(sw, aes, out)
    # Stages only for the K of some CALM point (an AE listed for a K outside the grid is not trained).
    used = {p["k"] for p in points if spec_of(p["arch"]).uses_autoencoder}
    stages = {name: [st for st in sts if st["k"] in used] for name, sts in aes.stages.items()}
    sw.missing_inputs = [(k, path) for k, path in sw.missing_inputs if k is None or k in used]
    return _write_plan(sw, out, points, cfgs, stages)
