#!/usr/bin/env python3
"""Structure checks that CI runs (tests/test_structure.py):

  cycle     no import circle between the modules of calm_pretrain and data_pipeline. Every import
            counts, also one made inside a function (it still ties the two modules together; it
            only defers the failure to run time), except under `if TYPE_CHECKING:`. An import names
            one module: `from a.b import c` is an edge to a.b.c when that is a module, else to a.b;
            the parent packages a module's import also loads are not edges of their own.
  package   no import circle between packages (reported, allow-listed like the rest): a node is a
            first-level subpackage of calm_pretrain (calm_pretrain.train, calm_pretrain.models with
            its architectures, ...), a top-level module of calm_pretrain (calm_pretrain.config,
            calm_pretrain.cli), the io module data_pipeline.files, calm-data's command module
            data_pipeline.cli (the top layer, as calm_pretrain.cli is), or the rest of data_pipeline;
            an edge is any module import between two nodes. `package calm_pretrain.a calm_pretrain.b ...` lists one circle's nodes.
  private   no import of a `_private` name from another module, and no import of a `_private`
            module from outside its package (by calm_pretrain, data_pipeline and tools).
  file      no file in calm_pretrain/, data_pipeline/, tools/ over MAX_FILE_LINES lines.
  function  no function there over MAX_FUNCTION_LINES lines (def line to last line; a nested
            function counts in its own right and inside its outer one).
  dispatch  no architecture dispatch outside the model registry (calm_pretrain/models/): no
            `isinstance(x, <a model config class>)` and no comparison of an `arch` value with a
            string or an ARCH_* constant. Such code asks the architecture's spec instead
            (calm_pretrain.models.spec_of). Counted per function: `dispatch FILE::FUNCTION N`.

Today's known violations are listed in tools/structure_allowlist.txt, one a line:

  cycle calm_pretrain.a calm_pretrain.b            the modules of one circle (sorted)
  private calm_pretrain.demo calm_pretrain.config._build
  file calm_pretrain/config.py 526                 at most 526 lines
  function calm_pretrain/demo.py::run_demo 250     at most 250 lines
  dispatch calm_pretrain/sweep/plan.py::row 3      at most 3 dispatch sites in that function

The check fails on a violation that is not listed (or a file or function longer than its listed
length) and on a listed entry that no longer occurs, so the list can only shrink: remove the entry
the report names. `--write-allowlist` rewrites the list from the tree (for review in the diff).

    python3 tools/check_structure.py [--root DIR] [--allowlist FILE] [--write-allowlist]
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calm_pretrain", "data_pipeline")
SIZE_DIRS = ("calm_pretrain", "data_pipeline", "tools")
SIZE_SUFFIXES = (".py", ".sh")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
ALLOWLIST = Path("tools") / "structure_allowlist.txt"
REGISTRY_DIR = "calm_pretrain/models"  # the one place that may tell architectures apart


@dataclass(frozen=True)
class Violation:
    key: str  # the allow-list entry without its number: "kind what"
    limit: int | None  # file and function lengths: the line count; else None
    detail: str  # the report's explanation

    def entry(self) -> str:
        return self.key if self.limit is None else f"{self.key} {self.limit}"


@dataclass
class Import:
    module: str  # the module imported (one of ours)
    names: list[str] = field(default_factory=list)  # from-import names that are not modules
    line: int = 0


# --------------------------------------------------------------------------------------------
# Modules and their imports
# --------------------------------------------------------------------------------------------
def source_files(root: Path, dirs, suffixes) -> list[Path]:
    out = []
    for d in dirs:
        out += [p for p in (root / d).rglob("*") if p.suffix in suffixes and p.is_file()
                and "__pycache__" not in p.parts]
    return sorted(out)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                continue
            stack.append(child)


def _owner(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(path: Path, module: str, modules: set[str]) -> list[Import]:
    """The imports of our modules that one file makes."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owner(alias.name, modules)
                if target:
                    out.append(Import(target, line=node.lineno))
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
            base = ".".join([*anchor, *([base] if base else [])])
        target = _owner(base, modules)
        if target is None:
            continue
        plain = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:  # `from pkg import module`: an edge to that module
                out.append(Import(sub, line=node.lineno))
            else:
                plain.append(alias.name)
        if plain:
            out.append(Import(target, plain, node.lineno))
    return out


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[Import]]]:
    files = {module_name(root, p): p for p in source_files(root, PACKAGES, (".py",))}
    modules = set(files)
    return files, {m: imports_of(p, m, modules) for m, p in files.items()}


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative) with more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def _a_circle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One shortest circle through the first module of a component (breadth first, inside it)."""
    inside, start = set(members), members[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & inside):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return members


def check_cycles(root: Path) -> list[Violation]:
    files, imports = import_graph(root)
    graph = {m: {i.module for i in imports[m] if i.module != m} for m in files}
    out = []
    for comp in _components(graph):
        circle = _a_circle(graph, comp)
        where = []
        for a, b in zip(circle, circle[1:]):
            line = min(i.line for i in imports[a] if i.module == b)
            where.append(f"{files[a].relative_to(root)}:{line} imports {b}")
        out.append(Violation("cycle " + " ".join(comp), None,
                             f"import circle {' -> '.join(circle)} ({'; '.join(where)})"
                             + (f"; the circle's component also holds {', '.join(sorted(set(comp) - set(circle)))}"
                                if set(comp) - set(circle) else "")))
    return out


OWN_NODES = ("data_pipeline.files", "data_pipeline.cli")  # the io module; calm-data's command module


def package_of(module: str) -> str:
    """The node of `module` in the package graph (see the docstring's `package`)."""
    if module in OWN_NODES:
        return module
    parts = module.split(".")
    return parts[0] if parts[0] == "data_pipeline" else ".".join(parts[:2])


def check_package_cycles(root: Path) -> list[Violation]:
    files, imports = import_graph(root)
    graph: dict[str, set[str]] = {}
    example: dict[tuple[str, str], str] = {}
    for m in files:
        a = package_of(m)
        graph.setdefault(a, set())
        for i in imports[m]:
            b = package_of(i.module)
            if a != b:
                graph[a].add(b)
                graph.setdefault(b, set())
                example.setdefault((a, b), f"{files[m].relative_to(root)}:{i.line} imports {i.module}")
    out = []
    for comp in _components(graph):
        circle = _a_circle(graph, comp)
        where = "; ".join(example[a, b] for a, b in zip(circle, circle[1:]))
        out.append(Violation("package " + " ".join(comp), None,
                             f"package circle {' -> '.join(circle)} ({where}); its component: {', '.join(comp)}"))
    return out


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def check_private(root: Path) -> list[Violation]:
    files = {module_name(root, p): p for p in source_files(root, PACKAGES, (".py",))}
    modules = set(files)
    importers = {**files, **{module_name(root, p): p for p in source_files(root, ("tools",), (".py",))}}
    found: dict[str, Violation] = {}
    for importer, path in sorted(importers.items()):
        for imp in imports_of(path, importer, modules):
            where = f"{path.relative_to(root)}:{imp.line}"
            parts = imp.module.split(".")
            for n, part in enumerate(parts):
                package = ".".join(parts[:n])
                if _private(part) and not (importer == package or importer.startswith(package + ".")):
                    key = f"private {importer} {imp.module}"
                    found.setdefault(key, Violation(key, None, f"{where} imports the private module {imp.module}"))
            if imp.module == importer:
                continue
            for name in imp.names:
                if _private(name):
                    key = f"private {importer} {imp.module}.{name}"
                    found.setdefault(key, Violation(key, None, f"{where} imports {name} from {imp.module}"))
    return list(found.values())


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, line count) of every function, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def check_sizes(root: Path) -> list[Violation]:
    out = []
    for path in source_files(root, SIZE_DIRS, SIZE_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            out.append(Violation(f"file {rel}", lines, f"{rel}: {lines} lines (at most {MAX_FILE_LINES})"))
        if path.suffix != ".py":
            continue
        for name, n in _functions(ast.parse(text, rel)):
            if n > MAX_FUNCTION_LINES:
                out.append(Violation(f"function {rel}::{name}", n,
                                     f"{rel}: {name} is {n} lines (at most {MAX_FUNCTION_LINES})"))
    return out


def model_config_classes(root: Path) -> set[str]:
    """Names of the dataclasses defined under calm_pretrain/models/ whose name ends in Config."""
    names = set()
    for path in sorted((root / REGISTRY_DIR).rglob("*.py")):
        names |= {n.name for n in ast.walk(ast.parse(path.read_text(), str(path)))
                  if isinstance(n, ast.ClassDef) and n.name.endswith("Config")}
    return names


def _terminal_name(node: ast.AST) -> str:
    """`x` of `x`, `a.b.x` and `a["x"]`; else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return ""


def _is_dispatch(node: ast.AST, config_classes: set[str]) -> bool:
    if isinstance(node, ast.Call) and _terminal_name(node.func) == "isinstance" and len(node.args) == 2:
        kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
        return any(_terminal_name(k) in config_classes for k in kinds)
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        archish = any(_terminal_name(o) == "arch" or _terminal_name(o).endswith("_arch") for o in operands)
        literal = any((isinstance(o, ast.Constant) and isinstance(o.value, str))
                      or _terminal_name(o).startswith("ARCH_")
                      or (isinstance(o, (ast.Tuple, ast.List, ast.Set)) and o.elts
                          and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in o.elts))
                      for o in operands)
        return archish and literal
    return False


def _dispatch_sites(tree: ast.AST, config_classes: set[str], prefix: str = "<module>"):
    """(innermost function's qualified name, node) of every dispatch site."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name if prefix == "<module>" else f"{prefix}.{node.name}"
            yield from _dispatch_sites(node, config_classes, name)
            continue
        if _is_dispatch(node, config_classes):
            yield prefix, node
        yield from _dispatch_sites(node, config_classes, prefix)


def check_dispatch(root: Path) -> list[Violation]:
    config_classes = model_config_classes(root)
    counts: dict[str, list[int]] = {}
    for path in source_files(root, SIZE_DIRS, (".py",)):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(REGISTRY_DIR + "/"):
            continue
        for function, node in _dispatch_sites(ast.parse(path.read_text(), rel), config_classes):
            counts.setdefault(f"{rel}::{function}", []).append(node.lineno)
    return [Violation(f"dispatch {where}", len(lines), f"{where}: {len(lines)} architecture dispatch "
                      f"site(s) outside the registry (lines {', '.join(map(str, lines))}); ask spec_of(cfg)")
            for where, lines in counts.items()]


def find_violations(root: Path) -> list[Violation]:
    return (check_cycles(root) + check_package_cycles(root) + check_private(root) + check_sizes(root)
            + check_dispatch(root))


# --------------------------------------------------------------------------------------------
# The allow-list and the report
# --------------------------------------------------------------------------------------------
def read_allowlist(path: Path) -> dict[str, int | None]:
    """{key: limit or None}; blank lines and # comments are skipped."""
    out: dict[str, int | None] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] in ("file", "function", "dispatch"):
            if len(words) != 3 or not words[2].isdigit():
                raise SystemExit(f"{path}: {raw!r}: expected `{words[0]} NAME LINES`")
            out[" ".join(words[:2])] = int(words[2])
        else:
            out[" ".join(words)] = None
    return out


def compare(violations: list[Violation], allowed: dict[str, int | None]) -> tuple[list, list, list]:
    """(new violations, stale allow-list entries, allowed lengths that could be lowered)."""
    new, lower = [], []
    seen = set()
    for v in violations:
        seen.add(v.key)
        if v.key not in allowed:
            new.append(v.detail)
        elif v.limit is not None and allowed[v.key] is not None and v.limit > allowed[v.key]:
            new.append(f"{v.detail}: grew past its allow-listed {allowed[v.key]}")
        elif v.limit is not None and allowed[v.key] is not None and v.limit < allowed[v.key]:
            lower.append(f"{v.key} {allowed[v.key]} -> {v.limit}")
    stale = [k if allowed[k] is None else f"{k} {allowed[k]}" for k in allowed if k not in seen]
    return new, stale, lower


HEADER = """\
# Known structure violations (tools/check_structure.py): the check fails on any violation not listed
# here and on an entry here that no longer occurs, so this list only shrinks. Lengths are upper bounds.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    p.add_argument("--allowlist", type=Path, help=f"default: ROOT/{ALLOWLIST}")
    p.add_argument("--write-allowlist", action="store_true", help="rewrite the allow-list from the tree")
    args = p.parse_args(argv)
    root = args.root.resolve()
    allowlist = args.allowlist or root / ALLOWLIST
    violations = find_violations(root)
    if args.write_allowlist:
        allowlist.write_text(HEADER + "".join(v.entry() + "\n" for v in sorted(violations, key=lambda v: v.key)))
        print(f"wrote {len(violations)} entries to {allowlist}")
        return 0
    new, stale, lower = compare(violations, read_allowlist(allowlist))
    print(f"structure: {len(violations)} known violations allowed by {allowlist.name}, {len(new)} new, "
          f"{len(stale)} allow-list entries no longer occur")
    for detail in new:
        print(f"  NEW: {detail}")
    for entry in stale:
        print(f"  FIXED: remove `{entry}` from {allowlist.name}")
    for entry in lower:
        print(f"  shorter now (the allow-list may say so): {entry}")
    return 1 if new or stale else 0


if __name__ == "__main__":
    sys.exit(main())
