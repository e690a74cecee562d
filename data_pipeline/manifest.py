"""``manifest.json``: what a shard directory holds, and the per-shard ``.done`` records.

A shard directory (token or latent shards) contains::

    manifest.json              written last, when every shard is finished (``complete: true``)
    job.json                   the job's parameters, written first; a re-run with other parameters is refused
    tokens-00000.arrow         shards (Arrow IPC + zstd, see shards.py)
    tokens-00000.arrow.done    one JSON record per finished shard: counts, bytes, sha256

A shard counts as finished only when its ``.done`` record exists and the file's size and sha256 match it;
an interrupted job is finished by re-running it, which redoes only unfinished or damaged shards. The
manifest is assembled from the ``.done`` records and repeats them, so a complete directory is described
by one file. It never holds a timestamp: the same job gives a byte-identical manifest.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from data_pipeline.errors import IncompatibleDataError, ManifestError
from data_pipeline.files import atomic_write_json, canonical_hash, sha256_file

MANIFEST_NAME = "manifest.json"
JOB_NAME = "job.json"
DONE_SUFFIX = ".done"
FORMAT = "calm-data-manifest"
VERSION = 1


@dataclass
class ShardEntry:
    """One finished shard: its file name (relative to the manifest), counts and checksum."""

    file: str
    num_samples: int
    num_tokens: int
    bytes: int
    sha256: str
    stats: dict = field(default_factory=dict)  # per-shard extras (documents, source shard, ...)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        return cls(file=d["file"], num_samples=int(d["num_samples"]), num_tokens=int(d["num_tokens"]),
                   bytes=int(d["bytes"]), sha256=d["sha256"], stats=dict(d.get("stats", {})))


@dataclass
class Manifest:
    kind: str  # "tokens" | "latents"
    layout: str  # "lm" (documents joined with a separator) | "ae" (document + EOS, padded to K)
    k: int
    seq_chunks: int  # L: chunks per sample
    sample_tokens: int  # L·K
    token_dtype: str  # "uint16" | "int32"
    tokenizer: dict  # spec, type, fingerprint, vocab_size, bos_id, eos_id, pad_id
    shards: list = field(default_factory=list)  # [ShardEntry]
    stats: dict = field(default_factory=dict)
    job: dict = field(default_factory=dict)
    latent: Optional[dict] = None  # latents only: latent_dim, dtype, ae_fingerprint, ae_config, token_manifest
    complete: bool = True
    path: Optional[Path] = None  # where it was read from / written to (not serialised)

    # ---- derived --------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        if self.path is None:
            raise ManifestError("manifest has no path (it was never written or read)")
        return self.path.parent

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def latent_dim(self) -> Optional[int]:
        return None if self.latent is None else int(self.latent["latent_dim"])

    @property
    def ae_fingerprint(self) -> Optional[str]:
        return None if self.latent is None else self.latent.get("ae_fingerprint")

    @property
    def max_token_id(self) -> Optional[int]:
        """The largest token id in the shards (recorded per shard), else the tokenizer's largest possible id."""
        recorded = [s.stats.get("max_id") for s in self.shards]
        if recorded and all(isinstance(x, int) for x in recorded):
            return max(recorded)
        vocab = self.tokenizer.get("vocab_size")
        return None if vocab is None else int(vocab) - 1

    @property
    def tokenizer_fingerprint(self) -> Optional[str]:
        return self.tokenizer.get("fingerprint")

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.directory / entry.file

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "layout": self.layout,
            "k": self.k,
            "seq_chunks": self.seq_chunks,
            "sample_tokens": self.sample_tokens,
            "token_dtype": self.token_dtype,
            "tokenizer": self.tokenizer,
            "latent": self.latent,
            "complete": self.complete,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_bytes": self.num_bytes,
            "stats": self.stats,
            "job": self.job,
            "shards": [asdict(s) for s in self.shards],
        }

    def fingerprint(self) -> str:
        """Hash of everything the manifest says (its location excluded)."""
        return canonical_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, path: Optional[Path] = None) -> "Manifest":
        where = path or "manifest"
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a calm-data manifest (format = {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ManifestError(f"{where}: manifest version {d.get('version')!r}; this code reads {VERSION}")
        try:
            return cls(kind=d["kind"], layout=d["layout"], k=int(d["k"]), seq_chunks=int(d["seq_chunks"]),
                       sample_tokens=int(d["sample_tokens"]), token_dtype=d["token_dtype"],
                       tokenizer=dict(d["tokenizer"]), shards=[ShardEntry.from_dict(s) for s in d["shards"]],
                       stats=dict(d.get("stats", {})), job=dict(d.get("job", {})), latent=d.get("latent"),
                       complete=bool(d.get("complete", False)), path=path)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------
def manifest_path(path: str | os.PathLike) -> Path:
    """A manifest file, or a directory holding ``manifest.json``."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def load_manifest(path: str | os.PathLike, require_complete: bool = True, check_files: bool = True) -> Manifest:
    """Read a manifest (file or directory). With `check_files`, every listed shard must exist with the
    listed size (cheap: one stat per shard); the error names the shard and the manifest."""
    mp = manifest_path(path)
    if not mp.is_file():
        hint = ""
        if mp.parent.is_dir() and any(p.name.endswith(DONE_SUFFIX) for p in mp.parent.iterdir()):
            hint = " (shards are there but the job did not finish: re-run it to complete the directory)"
        raise ManifestError(f"no manifest at {mp}{hint}")
    try:
        d = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{mp}: cannot read manifest ({e})") from None
    if not isinstance(d, dict):
        raise ManifestError(f"{mp}: not a manifest (top level is {type(d).__name__})")
    m = Manifest.from_dict(d, path=mp)
    if require_complete and not m.complete:
        raise ManifestError(f"{mp}: the job that writes this directory did not finish; re-run it")
    if check_files:
        check_shard_files(m)
    return m


def check_shard_files(m: Manifest) -> None:
    for entry in m.shards:
        p = m.shard_path(entry)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ManifestError(f"{m.path}: lists shard {entry.file}, which does not exist ({p})") from None
        if size != entry.bytes:
            raise ManifestError(f"{m.path}: shard {entry.file} has {size} bytes, the manifest says "
                                f"{entry.bytes} (truncated or replaced)")


def write_manifest(m: Manifest, directory: str | os.PathLike) -> Path:
    path = Path(directory) / MANIFEST_NAME
    atomic_write_json(path, m.to_dict())
    m.path = path
    return path


# --------------------------------------------------------------------------------------------
# Job parameters: a re-run continues a job only if it is the same job
# --------------------------------------------------------------------------------------------
def claim_job(directory: Path, params: dict) -> None:
    """Record `params` in ``job.json``, or check that they equal the recorded ones. A job that never
    finished a shard (it failed at its start: a bad input, a wrong option) holds nothing worth keeping,
    so it does not lock the directory against the corrected job."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / JOB_NAME
    params = json.loads(json.dumps(params))  # normalise tuples etc.
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: unreadable ({e}); delete it to start the job afresh") from None
        if old != params and not _holds_output(directory):
            atomic_write_json(path, params)
            return
        if old != params:
            diff = [f"{k}: {old.get(k)!r} (recorded) vs {params.get(k)!r} (now)"
                    for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)]
            raise ManifestError(f"{directory} holds the output of a different job; use a new output "
                                f"directory or delete this one. Differences: " + "; ".join(diff))
        return
    atomic_write_json(path, params)


def _holds_output(directory: Path) -> bool:
    """A finished shard or a manifest: the output of a job that got somewhere."""
    return (directory / MANIFEST_NAME).exists() or any(p.name.endswith(DONE_SUFFIX) for p in directory.iterdir())


# --------------------------------------------------------------------------------------------
# Per-shard completion records
# --------------------------------------------------------------------------------------------
def done_path(shard: Path) -> Path:
    return shard.with_name(shard.name + DONE_SUFFIX)


def write_done(shard: Path, entry: ShardEntry) -> None:
    atomic_write_json(done_path(shard), asdict(entry))


def read_done(shard: Path, verify: bool = True) -> Optional[ShardEntry]:
    """The finished-shard record of `shard`, or None if the shard is not finished or does not match its
    record (missing, other size, other sha256 when `verify`)."""
    rec = done_path(shard)
    if not rec.is_file():
        return None
    try:
        entry = ShardEntry.from_dict(json.loads(rec.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    try:
        if shard.stat().st_size != entry.bytes:
            return None
    except FileNotFoundError:
        return None
    if verify and sha256_file(shard) != entry.sha256:
        return None
    return entry


def finished_shards(shards: list[Path], progress: bool = False, desc: str = "checking finished shards") -> dict:
    """{shard path: entry} of the shards that are finished and verified (sha256); the others are
    removed with their records so that they are redone. A progress bar when `progress` (hashing a
    large directory takes a while)."""
    from tqdm import tqdm

    out = {}
    recorded = [s for s in shards if done_path(s).is_file()]
    for shard in tqdm(recorded, desc=desc, unit="shard", disable=not progress or not recorded, dynamic_ncols=True):
        entry = read_done(shard, verify=True)
        if entry is None:
            forget_shard(shard)
        else:
            out[shard] = entry
    for shard in shards:
        if shard not in out:
            forget_shard(shard)
    return out


def forget_shard(shard: Path) -> None:
    """Remove a shard and its record (before it is redone)."""
    for p in (done_path(shard), shard):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Compatibility between shards and a run
# --------------------------------------------------------------------------------------------
def check_compatible(manifest: Manifest | str | os.PathLike, *, k: Optional[int] = None,
                     latent_dim: Optional[int] = None, ae_fingerprint: Optional[str] = None,
                     tokenizer_fingerprint: Optional[str] = None, sample_tokens: Optional[int] = None,
                     vocab_size: Optional[int] = None, kind: Optional[str] = None) -> Manifest:
    """Raise :class:`IncompatibleDataError` unless the shards were made for this configuration.

    Arguments left as None are not checked. The message names the manifest file, the run's value and
    the shards' value. Latent-only properties (latent_dim, ae_fingerprint) asked of token shards are an
    error too: such a run needs latent shards. `kind` "tokens" refuses latent shards (a run that encodes
    its latents itself, ``data.latents=on_the_fly``, reads token shards)."""
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, check_files=False)
    where = m.path or "manifest"

    def bad(what: str, run_value: Any, data_value: Any) -> IncompatibleDataError:
        return IncompatibleDataError(f"{where}: the shards have {what} = {data_value!r} but the run's config "
                                     f"has {what} = {run_value!r}; re-make the shards or fix the config")

    if k is not None and int(k) != m.k:
        raise bad("K (tokens per chunk)", k, m.k)
    if sample_tokens is not None and int(sample_tokens) != m.sample_tokens:
        raise bad("tokens per sample (L·K)", sample_tokens, m.sample_tokens)
    if kind == "tokens" and m.kind != "tokens":
        source = ((m.latent or {}).get("token_manifest") or {}).get("path")
        raise IncompatibleDataError(f"{where}: holds {m.kind} shards, but data.latents = on_the_fly reads token "
                                    f"shards and encodes them with model.ae_path in the step; give the token shards"
                                    + (f" these were encoded from ({source})" if source else "")
                                    + ", or set data.latents=stored to train on these latents")
    if (latent_dim is not None or ae_fingerprint is not None) and m.kind != "latents":
        raise IncompatibleDataError(f"{where}: holds {m.kind} shards, but the run needs latent shards "
                                    f"(pre-encoded with the autoencoder: calm-data encode), or set "
                                    f"data.latents=on_the_fly to encode these token shards in the step")
    if latent_dim is not None and int(latent_dim) != m.latent_dim:
        raise bad("latent dim d", latent_dim, m.latent_dim)
    if ae_fingerprint is not None and ae_fingerprint != m.ae_fingerprint:
        raise bad("autoencoder fingerprint", ae_fingerprint, m.ae_fingerprint)
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != m.tokenizer_fingerprint:
        raise bad("tokenizer fingerprint", tokenizer_fingerprint, m.tokenizer_fingerprint)
    if vocab_size is not None and m.max_token_id is not None and m.max_token_id >= int(vocab_size):
        raise IncompatibleDataError(f"{where}: the shards hold token ids up to {m.max_token_id} but the model's "
                                    f"vocabulary has {vocab_size} entries (model.vocab_size): those ids would index "
                                    f"past its embedding; set model.vocab_size >= {m.max_token_id + 1}")
    return m


def schema_mismatches(m: Manifest, spec) -> list[str]:
    """Where a shard's own schema (its ``ShardSpec``) disagrees with the manifest that lists it."""
    pairs = [("kind", m.kind, spec.kind), ("k", m.k, spec.k), ("seq_chunks", m.seq_chunks, spec.seq_chunks),
             ("sample_tokens", m.sample_tokens, spec.sample_tokens), ("token_dtype", m.token_dtype, spec.token_dtype)]
    if m.kind == "latents" or spec.kind == "latents":
        pairs += [("latent.latent_dim", m.latent_dim, spec.latent_dim),
                  ("latent.dtype", (m.latent or {}).get("dtype"), spec.latent_dtype)]
    return [f"{name} = {a!r} in the manifest, {b!r} in the shard" for name, a, b in pairs if a != b]


def check_shard_schema(m: Manifest, spec, shard: Path) -> None:
    """Refuse a manifest that does not describe its shards (edited by hand, or copied from another job):
    a run would otherwise fail later on a raw shape error, or train on misread samples."""
    problems = schema_mismatches(m, spec)
    if problems:
        raise ManifestError(f"{m.path}: does not match its shard {shard} ({'; '.join(problems)}); the manifest was "
                            f"edited or belongs to other shards: re-make the directory (`calm-data verify` checks all)")


def check_same_kind(manifests: Iterable[Manifest]) -> None:
    """Datasets blended into one stream must agree on everything that shapes a sample."""
    ms = list(manifests)
    for other in ms[1:]:
        first = ms[0]
        for what, a, b in [("kind", first.kind, other.kind), ("K", first.k, other.k),
                           ("tokens per sample", first.sample_tokens, other.sample_tokens),
                           ("latent dim", first.latent_dim, other.latent_dim),
                           ("autoencoder fingerprint", first.ae_fingerprint, other.ae_fingerprint),
                           ("tokenizer fingerprint", first.tokenizer_fingerprint, other.tokenizer_fingerprint)]:
            if a != b:
                raise IncompatibleDataError(f"cannot blend {first.path} ({what} = {a!r}) with {other.path} "
                                            f"({what} = {b!r})")
