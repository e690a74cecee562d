"""Tokenizers behind one small interface.

``load_tokenizer(spec)`` understands:

- ``"demo"``: a byte-level BPE (vocabulary 4096, [PAD]=0, <|begin_of_text|>=1, <|end_of_text|>=2) trained
  with the ``tokenizers`` library on the Python standard library's own docstrings and
  ``pydoc_data.topics``, so it needs no download. It is built once (~6 s) and cached in
  ``$CALM_CACHE_DIR`` (default ``~/.cache/calm_pretrain``); :func:`build_demo_tokenizer` writes it to any
  directory, which ``load_tokenizer(dir)`` (and ``transformers.AutoTokenizer``) load back.
- ``"llama3"`` or ``"llama3:DIR"`` or a directory holding a tiktoken ``tokenizer.model`` but no
  ``tokenizer.json``: the Llama-3 tokenizer built offline from the tiktoken ranks (Llama-3 pattern,
  specials 128000–128255, [PAD]=128256, vocabulary 128257). ``"llama3"`` alone looks in
  ``$CALM_LLAMA3_DIR`` or ``../shared/data/llama3_tokenizer`` beside the repository (an optional
  directory: docs/data.md, 'Optional data files'). It encodes with
  ``tiktoken`` (4-5x faster than a ``tokenizers`` BPE here); :func:`llama3_hf_backend` builds the
  equivalent ``tokenizers`` BPE from the same ranks and :func:`save_llama3_hf` writes it as a directory
  ``AutoTokenizer`` loads. The tests check both against a plain ``tiktoken.Encoding`` on real text.
- a directory written by :func:`build_demo_tokenizer` (a ``tokenizer.json`` plus ``calm_tokenizer.json``).
- anything else: a name or directory for ``transformers.AutoTokenizer.from_pretrained``.

Every tokenizer encodes text *as text*: a literal ``<|end_of_text|>`` inside a document is split like
any other string, never turned into the special id (tiktoken's ``encode_ordinary``).

The fingerprint is a hash of what decides the ids: vocabulary, merges, pre-tokenizer/normaliser and the
special tokens with their ids; two tokenizers with the same fingerprint give the same ids.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

from data_pipeline.errors import DataError
from data_pipeline.files import canonical_hash, looks_like_local_path

DEMO_VOCAB = 4096
DEMO_SPECIALS = ["[PAD]", "<|begin_of_text|>", "<|end_of_text|>"]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_BASE = 128000
LLAMA3_NUM_SPECIAL = 256
CALM_META = "calm_tokenizer.json"


class Tokenizer:
    """The interface the pipeline uses. `spec` reloads the same tokenizer in another process."""

    spec: str
    kind: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a manifest records about the tokenizer."""
        return {"spec": self.spec, "type": self.kind, "fingerprint": self.fingerprint,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, fingerprint={self.fingerprint})")


def _backend_fingerprint(tok_json: str) -> str:
    """Hash of the parts of a `tokenizers` JSON that decide the ids."""
    d = json.loads(tok_json)
    model = d.get("model") or {}
    specials = sorted((t["id"], t["content"]) for t in d.get("added_tokens", []))
    return canonical_hash({"model": model, "normalizer": d.get("normalizer"),
                           "pre_tokenizer": d.get("pre_tokenizer"), "added_tokens": specials})


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (Rust) with named special tokens; the demo and Llama-3 tokenizers."""

    def __init__(self, backend, spec: str, kind: str, bos: Optional[str], eos: Optional[str], pad: Optional[str]):
        self._tk = backend
        self._tk.encode_special_tokens = True  # specials in the text are text
        self.spec, self.kind = spec, kind
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (None if t is None else backend.token_to_id(t) for t in (bos, eos, pad))
        self.fingerprint = _backend_fingerprint(backend.to_str())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        enc = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike, bos: str, eos: str, pad: str) -> None:
        """A directory that `load_tokenizer` and `transformers.AutoTokenizer` both load."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
             "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 30}, indent=1))
        (d / CALM_META).write_text(json.dumps({"kind": self.kind, "bos": bos, "eos": eos, "pad": pad,
                                               "fingerprint": self.fingerprint}, indent=1))


class TransformersTokenizer(Tokenizer):
    """Anything `transformers.AutoTokenizer` loads (a hub name or a local directory)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        try:
            self._tk = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
            raise DataError(f"cannot load tokenizer {name!r} with transformers.AutoTokenizer "
                            f"({type(e).__name__}: {e})") from None
        self.spec, self.kind = name, f"transformers:{type(self._tk).__name__}"
        self.vocab_size = len(self._tk)
        self.bos_id, self.eos_id, self.pad_id = self._tk.bos_token_id, self._tk.eos_token_id, self._tk.pad_token_id
        backend = getattr(self._tk, "backend_tokenizer", None)
        if backend is not None:
            backend.encode_special_tokens = True
            self.fingerprint = _backend_fingerprint(backend.to_str())
        else:  # a slow (Python) tokenizer: hash its vocabulary and specials
            self.fingerprint = canonical_hash({"class": type(self._tk).__name__,
                                               "vocab": sorted(self._tk.get_vocab().items()),
                                               "specials": sorted(map(str, self._tk.all_special_tokens))})
        self._backend = backend

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return self._tk(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)


# --------------------------------------------------------------------------------------------
# The demo tokenizer
# --------------------------------------------------------------------------------------------
def stdlib_corpus(max_documents: Optional[int] = None) -> list[str]:
    """The standard library's docstrings (modules, classes, functions; tests excluded) and
    pydoc_data.topics, in a fixed order: ~2 MB of English that every Python install has.
    ``max_documents``: the first N of that list (stops reading files once it has them)."""
    import pydoc_data.topics as topics

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
    texts: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc)
            if max_documents is not None and len(texts) >= max_documents:
                return texts[:max_documents]
    texts += [topics.topics[k] for k in sorted(topics.topics)]
    return texts[:max_documents]


def build_demo_tokenizer(directory: str | os.PathLike, vocab_size: int = DEMO_VOCAB,
                         texts: Optional[Sequence[str]] = None) -> HFTokenizer:
    """Train the demo byte-level BPE and save it to `directory` (written atomically); on `texts` when
    given (e.g. only a corpus's training split), else on :func:`stdlib_corpus`."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DEMO_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(stdlib_corpus() if texts is None else texts, trainer=trainer)
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = HFTokenizer(tk, str(directory), "demo-bpe", *DEMO_SPECIALS[1:], DEMO_SPECIALS[0])
    out.save(tmp, bos=DEMO_SPECIALS[1], eos=DEMO_SPECIALS[2], pad=DEMO_SPECIALS[0])
    if directory.exists():  # another process finished first: keep theirs (identical)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(str(directory))


def cache_dir() -> Path:
    return Path(os.environ.get("CALM_CACHE_DIR") or Path.home() / ".cache" / "calm_pretrain")


def demo_tokenizer_dir() -> Path:
    v = sys.version_info
    return cache_dir() / f"demo_tokenizer-py{v.major}.{v.minor}"  # the corpus is this Python's stdlib


# --------------------------------------------------------------------------------------------
# Llama-3 from its tiktoken ranks
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def llama3_special_tokens(directory: Optional[Path] = None) -> list[str]:
    """The 256 specials from id 128000: names from tokenizer_config.json when present, else Llama-3's."""
    if directory is not None and (directory / "tokenizer_config.json").is_file():
        cfg = json.loads((directory / "tokenizer_config.json").read_text())
        decoder = cfg.get("added_tokens_decoder", {})
        names = {int(i): t["content"] for i, t in decoder.items()}
        if all(LLAMA3_NUM_BASE + i in names for i in range(LLAMA3_NUM_SPECIAL)):
            return [names[LLAMA3_NUM_BASE + i] for i in range(LLAMA3_NUM_SPECIAL)]
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}
    out, reserved = [], 0
    for i in range(LLAMA3_NUM_SPECIAL):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def default_llama3_dir() -> Path:
    env = os.environ.get("CALM_LLAMA3_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama3_tokenizer"


def _load_ranks(model_file: Path) -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    if not model_file.is_file():
        raise DataError(f"Llama-3 tokenizer: {model_file} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(model_file))
    except Exception as e:  # noqa: BLE001 - tiktoken raises plain exceptions on malformed files
        raise DataError(f"Llama-3 tokenizer: cannot read tiktoken ranks from {model_file} ({e})") from None
    if len(ranks) != LLAMA3_NUM_BASE or sorted(ranks.values()) != list(range(LLAMA3_NUM_BASE)):
        raise DataError(f"Llama-3 tokenizer: {model_file} has {len(ranks)} ranks, expected 0..{LLAMA3_NUM_BASE - 1}")
    return ranks


def _llama3_specials(directory: Path) -> list[str]:
    return llama3_special_tokens(directory) + ["[PAD]"]


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE (ranks + split pattern + specials): the Llama-3 tokenizer."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, specials: list[str], base: int, spec: str,
                 kind: str, bos: str, eos: str, pad: str):
        import tiktoken

        self.specials = {name: base + i for i, name in enumerate(specials)}
        self._enc = tiktoken.Encoding(kind, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        self.spec, self.kind = spec, kind
        self.vocab_size = self._enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = self.specials[bos], self.specials[eos], self.specials[pad]
        self.special_start = base
        blob = b"".join(len(t).to_bytes(2, "little") + t for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]))
        self.fingerprint = canonical_hash({"type": "tiktoken-bpe", "pattern": pattern,
                                           "ranks": hashlib.sha256(blob).hexdigest(),
                                           "specials": sorted((i, name) for name, i in self.specials.items())})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)  # processes give the parallelism

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.special_start]
        return self._enc.decode(ids, errors="replace")


def load_llama3(directory: Optional[str | os.PathLike] = None) -> TiktokenTokenizer:
    d = Path(directory) if directory else default_llama3_dir()
    ranks = _load_ranks(d / "tokenizer.model")
    return TiktokenTokenizer(ranks, LLAMA3_PATTERN, _llama3_specials(d), LLAMA3_NUM_BASE, f"llama3:{d}",
                             "llama3-tiktoken", "<|begin_of_text|>", "<|end_of_text|>", "[PAD]")


def llama3_hf_backend(directory: Optional[str | os.PathLike] = None):
    """A `tokenizers.Tokenizer` equivalent to tiktoken's encoding with the Llama-3 ranks (~3 s to build).

    tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank.
    The equivalent HF BPE has one merge (a, b) for every way of splitting a token into two tokens,
    ordered by the rank of a+b, and takes whole pre-tokens found in the vocabulary directly
    (`ignore_merges`), as tiktoken does."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    d = Path(directory) if directory else default_llama3_dir()
    ranks = _load_ranks(d / "tokenizer.model")
    b2u = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], s(left), s(right)))
    merges.sort()
    tk = RustTokenizer(BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=False, ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = _llama3_specials(d)
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    for i, t in enumerate(specials):
        if tk.token_to_id(t) != LLAMA3_NUM_BASE + i:
            raise DataError(f"Llama-3 tokenizer: special {t} got id {tk.token_to_id(t)}, expected {LLAMA3_NUM_BASE + i}")
    return tk


def save_llama3_hf(out_dir: str | os.PathLike, directory: Optional[str | os.PathLike] = None) -> HFTokenizer:
    """Write the Llama-3 tokenizer (+[PAD]) as a `tokenizer.json` directory that `load_tokenizer` and
    `transformers.AutoTokenizer` load (same ids as the tiktoken one, but slower)."""
    tok = HFTokenizer(llama3_hf_backend(directory), str(out_dir), "llama3-bpe", "<|begin_of_text|>",
                      "<|end_of_text|>", "[PAD]")
    tok.save(out_dir, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="[PAD]")
    return tok


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_tokenizer(spec: str) -> Tokenizer:
    """See the module docstring for what `spec` may be."""
    spec = str(spec)
    if spec == "demo":
        d = demo_tokenizer_dir()
        if not (d / CALM_META).is_file():
            build_demo_tokenizer(d)
        tok = load_tokenizer(str(d))
        tok.spec = "demo"
        return tok
    if spec == "llama3" or spec.startswith("llama3:"):
        return load_llama3(spec.split(":", 1)[1] if ":" in spec else None)
    p = Path(spec)
    if not p.exists() and looks_like_local_path(spec):
        raise DataError(f"cannot load tokenizer {spec!r}: no such directory (expected demo, llama3[:DIR], a tokenizer "
                        f"directory or a hub tokenizer name)")
    if p.is_dir() and (p / CALM_META).is_file():
        from tokenizers import Tokenizer as RustTokenizer

        meta = json.loads((p / CALM_META).read_text())
        backend = RustTokenizer.from_file(str(p / "tokenizer.json"))
        return HFTokenizer(backend, spec, meta.get("kind", "bpe"), meta["bos"], meta["eos"], meta["pad"])
    if p.is_dir() and (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file():
        with open(p / "tokenizer.model", "rb") as f:
            head = f.read(64)
        if b" " in head.split(b"\n")[0]:  # "base64token rank": tiktoken ranks, not sentencepiece
            return load_llama3(p)
    return TransformersTokenizer(spec)
