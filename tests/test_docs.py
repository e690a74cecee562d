"""The README and docs/ stay true to the code: links resolve, shown commands parse, config keys exist.

* every relative link (and image) in README.md and docs/*.md names an existing file, and its #anchor
  a heading of that file;
* every `calm-pretrain`, `calm-data` and `calm-sweep` command shown in a fenced shell block (also via
  `torchrun ... -m calm_pretrain.cli`, `python3 tools/sweep.py`, ...) parses: its subcommand's `--help`
  runs, and the command line itself passes the argument parser (nothing is executed). For `train`,
  `config` and `params` the shown overrides also load as a run config, for `demo` as a pipeline config;
* every dotted config key shown in backticks (`train.lr`, `model.head.type=...`) is a field of the
  run config or of the main job's pipeline config;
* every "docs/<page>.md, '<section>'" reference in code, configs and scripts names an existing page
  and heading;
* README.md has at most 150 lines, and nothing in the repository refers to the notes that used to
  live outside it.

Everything runs in this process (the parsers are built, never the commands), in a few seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import typing
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".sbatch", ".md", ".txt", ".ini", ".cfg", ".toml", ".json"}
CODE_DIRS = ["calm_pretrain", "data_pipeline", "configs", "slurm", "tools", "tests", "docs", ".ci"]


def _repo_files():
    yield from (REPO / name for name in ("README.md", "setup.py", "pytest.ini"))
    for d in CODE_DIRS:
        for p in sorted((REPO / d).rglob("*")):
            if p.is_file() and (p.suffix in CODE_SUFFIXES or p.parent.name in ("slurm_standins", ".ci")):
                yield p


# --------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```([\w-]*)\s*$")


def _split_fences(text: str):
    """(prose lines, [(language, [lines])]) of a markdown file."""
    prose, blocks, block, lang = [], [], None, ""
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and block is None:
            block, lang = [], m.group(1)
        elif line.strip() == "```" and block is not None:
            blocks.append((lang, block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _headings(path: Path) -> list[str]:
    prose, _ = _split_fences(path.read_text())
    return [re.sub(r"^#+\s*", "", line).strip() for line in prose if re.match(r"^#{1,6}\s", line)]


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(path: Path):
    prose, _ = _split_fences(path.read_text())
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))
    return LINK.findall(text)


# --------------------------------------------------------------------------------------------
# (a) links
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    bad = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


# --------------------------------------------------------------------------------------------
# (b) shown commands parse
# --------------------------------------------------------------------------------------------
class _Parsed(Exception):
    pass


def _entry(tool: str):
    if tool == "calm-pretrain":
        from calm_pretrain.cli import main
    elif tool == "calm-data":
        from data_pipeline.cli import main
    else:
        from calm_pretrain.sweep import main
    return main


def _parse_only(tool: str, argv: list[str]):
    """Run the tool's argument parser on argv without running the command: (exit code, namespace)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _entry(tool)(argv)
        except _Parsed as parsed:
            return 0, parsed.args[0], ""
        except SystemExit as e:
            return e.code, None, err.getvalue() + out.getvalue()
    return None, None, "the command ran past its argument parser"


MODULES = {"calm_pretrain.cli": "calm-pretrain", "data_pipeline.cli": "calm-data", "calm_pretrain.sweep": "calm-sweep"}
SCRIPTS = {"tools/sweep.py": "calm-sweep"}


def _commands(words: list[str]):
    """(tool, argv) for every invocation of our tools in one shell command's words."""
    if not words:
        return
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return
    if words[0] in ("calm-pretrain", "calm-data", "calm-sweep"):
        yield words[0], words[1:]
    elif words[0] in ("torchrun", "srun", "python", "python3"):
        if "-m" in words:
            i = words.index("-m")
            if i + 1 < len(words) and words[i + 1] in MODULES:
                yield MODULES[words[i + 1]], words[i + 2:]
        for i, w in enumerate(words[1:], 1):
            if w in SCRIPTS:
                yield SCRIPTS[w], words[i + 1:]
            elif w in ("calm-pretrain", "calm-data", "calm-sweep"):  # srun calm-pretrain train ...
                yield w, words[i + 1:]
                break


def _shown_commands():
    out = []
    for doc in DOCS:
        _, blocks = _split_fences(doc.read_text())
        for lang, lines in blocks:
            if lang not in ("", "bash", "sh", "shell", "console"):
                continue
            text = "\n".join(lines).replace("\\\n", " ")
            for line in text.splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                # split chains: a && b ; c | d
                part: list[str] = []
                for w in words + [";"]:
                    if w in ("&&", "||", ";", "|", "do", "done", "then", "else", "fi"):
                        for tool, argv in _commands(part):
                            out.append((doc.relative_to(REPO), line.strip(), tool, argv))
                        part = []
                    else:
                        part.append(w.rstrip(";"))
    return out


SHOWN = _shown_commands()


def test_the_docs_show_commands_of_every_tool():
    assert {tool for _, _, tool, _ in SHOWN} == {"calm-pretrain", "calm-data", "calm-sweep"}


def _concrete(argv):
    """Overrides and paths that are placeholders (…, "$c", PLAN_DIR) cannot be checked further."""
    return not any(w in ("...", "…") or "$" in w or "…" in w for w in argv)


@pytest.mark.parametrize("doc,line,tool,argv", SHOWN, ids=[f"{d}:{t} {' '.join(a[:1])}" for d, _, t, a in SHOWN])
def test_every_shown_command_parses(doc, line, tool, argv):
    if tool == "calm-pretrain" and argv[:1] == ["launch"]:  # torchrun's options, then our own command
        assert "--" in argv, f"{doc}: `{line}`: launch needs `-- COMMAND`"
        argv = argv[argv.index("--") + 1:]
    code, ns, message = _parse_only(tool, argv)
    assert code == 0, f"{doc}: `{line}` does not parse (exit {code}): {message.strip()[-400:]}"
    if argv and not argv[0].startswith("-"):
        help_code, _, help_text = _help(tool, argv[0])
        assert help_code == 0 and "usage:" in help_text, f"{doc}: `{tool} {argv[0]} --help` failed"
    # the config keys of the shown overrides exist and their values are valid
    if tool == "calm-pretrain" and ns is not None and _concrete(argv):
        from calm_pretrain.config import load_config

        overrides = [o for o in getattr(ns, "overrides", []) if "=" in o]
        if ns.command in ("train", "config", "params"):
            load_config(REPO / ns.config if ns.config else None, overrides)
        elif ns.command == "demo":
            from calm_pretrain.demo import load_pipeline

            pipeline = load_pipeline(REPO / ns.config if ns.config else None, overrides)
            for name in ("ae", "calm", "transformer"):
                stage = getattr(pipeline.stages, name)
                load_config(REPO / stage.config, stage.overrides)


def _help(tool: str, sub: str):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            _entry(tool)([sub, "--help"])
        except SystemExit as e:
            return e.code, None, out.getvalue()
    return None, None, out.getvalue()


def test_a_removed_subcommand_or_flag_would_fail():
    assert _parse_only("calm-pretrain", ["no-such-command"])[0] == 2
    assert _parse_only("calm-data", ["tokenize", "x", "-o", "y", "--no-such-flag"])[0] == 2
    assert _parse_only("calm-sweep", ["plan", "x"])[0] == 2  # --out is required
    assert _parse_only("calm-pretrain", ["eval", "release/calm"])[0] == 0


# --------------------------------------------------------------------------------------------
# config keys shown in prose
# --------------------------------------------------------------------------------------------
def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _known_key(key: str) -> bool:
    from calm_pretrain.config import RunConfig
    from calm_pretrain.models import architectures
    from calm_pretrain.models.calm import HeadConfig
    from calm_pretrain.demo import PipelineConfig

    def walk(cls, parts):
        if not parts:
            return True
        fields = _fields(cls)
        if parts[0] not in fields:
            return False
        tp = fields[parts[0]]
        if dataclasses.is_dataclass(tp):
            return walk(tp, parts[1:])
        return len(parts) == 1

    parts = key.split(".")
    if parts[0] == "model":
        rest = parts[1:]
        if rest[:1] == ["head"]:
            return walk(HeadConfig, rest[1:])
        return any(walk(c, rest) for c in (s.config for s in architectures().values()))
    if parts[0] in ("ae", "calm", "transformer"):  # the main job: a stage's run config
        return _known_key(".".join(parts[1:])) or walk(PipelineConfig, ["stages", *parts])
    return walk(RunConfig, parts) or walk(PipelineConfig, parts)


SECTIONS = ("model", "data", "train", "eval", "parallel", "corpus", "tokenizer", "tokenize", "stages", "encode",
            "generate", "ae", "calm", "transformer")
NOT_KEYS = re.compile(r"\.(py|ya?ml|json|jsonl|md|png|csv|parquet|sbatch|sh|safetensors|bin|txt|arrow|done|model|"
                      r"weight|bias)$|[*{}\[\]<>/]")
SPAN_KEY = re.compile(r"^((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?:=.*)?$" % "|".join(SECTIONS))


def _shown_keys():
    keys = []
    for doc in DOCS:
        prose, blocks = _split_fences(doc.read_text())
        spans = re.findall(r"`([^`]+)`", "\n".join(prose))
        for span in spans:
            for piece in span.split():
                m = SPAN_KEY.match(piece.rstrip(",;:"))
                if m and not NOT_KEYS.search(m.group(1)):
                    keys.append((doc.relative_to(REPO), m.group(1)))
        for _, lines in blocks:  # overrides in commands: key=value
            for word in " ".join(lines).split():
                m = SPAN_KEY.match(word)
                if m and "=" in word and not NOT_KEYS.search(m.group(1)):
                    keys.append((doc.relative_to(REPO), m.group(1)))
    return sorted(set(keys))


def test_every_config_key_shown_exists():
    keys = _shown_keys()
    assert len(keys) > 40  # the check sees the keys (a broken pattern would pass silently)
    unknown = [f"{doc}: {key}" for doc, key in keys if not _known_key(key)]
    assert not unknown, "config keys in the docs that the config does not have: " + ", ".join(unknown)


# --------------------------------------------------------------------------------------------
# references to docs sections from code, configs and scripts
# --------------------------------------------------------------------------------------------
SECTION_REF = re.compile(r"docs/([\w-]+\.md),\s*((?:'[^'\n]+'(?:,\s*|\s+and\s+)?)+)")


def test_every_docs_section_named_in_the_code_exists():
    bad, seen = [], 0
    for path in _repo_files():
        if path.suffix == ".md" or path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        for page, sections in SECTION_REF.findall(re.sub(r"\s*\n\s*#?\s*", " ", text)):
            doc = REPO / "docs" / page
            if not doc.is_file():
                bad.append(f"{path.relative_to(REPO)}: docs/{page} does not exist")
                continue
            headings = set(_headings(doc))
            for section in re.findall(r"'([^']+)'", sections):
                seen += 1
                if section not in headings:
                    bad.append(f"{path.relative_to(REPO)}: docs/{page} has no section {section!r}")
    assert seen > 20
    assert not bad, "; ".join(bad)


# --------------------------------------------------------------------------------------------
# (c), (d)
# --------------------------------------------------------------------------------------------
def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 150, f"README.md has {n} lines; the limit is 150 (move detail to docs/)"


def test_readme_keeps_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash tools/setup.sh && calm-pretrain demo" in readme
    assert "bash tools/setup.sh && python3 -m pytest -q" in readme
    assert "bash tools/setup.sh && python3 -m pytest -q" in (REPO / ".ci" / "run").read_text()


def test_nothing_refers_to_notes_outside_the_repository():
    banned = ["CALM" + "_SPEC", "RELEASE" + "_LAYOUT"]  # split so that this file does not match itself
    hits = [f"{p.relative_to(REPO)}: {word}" for p in _repo_files() for word in banned
            if word in p.read_text(errors="replace")]
    assert not hits, "; ".join(hits)
