"""One description of a workflow's stages: what each runs, what it needs, what it makes and what its
done-key hashes; and the graph of them in dependency order, checked once (WorkflowError)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


class WorkflowError(ValueError):
    """A graph that cannot run: an unknown dependency, a cycle, a duplicate name, a stage out of order."""


@dataclass(frozen=True)
class Command:
    """`python -m <argv>`: one of the project's commands (calm_pretrain.cli, data_pipeline.cli, ...), as a
    user runs it; under torchrun (locally) when `processes` > 1, with OMP_NUM_THREADS=`threads` if set."""
    argv: tuple[str, ...]
    log: Optional[Path] = None  # the local runner's log file (default <run dir>/logs/<stage>.log)
    processes: int = 1
    threads: Optional[int] = None
    # Which output lines the local runner also logs (the rest only go to the log file); presentation only.
    echo: Optional[Callable[[str], bool]] = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        if not self.argv:
            raise WorkflowError("a command needs a module to run (argv is empty)")
        if self.processes < 1:
            raise WorkflowError(f"{self.argv[0]}: processes must be >= 1, got {self.processes}")


@dataclass(frozen=True)
class SlurmJob:
    """How a stage is submitted under Slurm, where that differs from wrapping its commands in a generated
    one-task script: through a batch script of the repository (slurm/sweep.sbatch: srun over every GPU,
    the requeue on a signal), and with sbatch options (an array, the nodes)."""
    script: Optional[str] = None  # e.g. "slurm/encode.sbatch", relative to the repository; None: generated
    args: tuple[str, ...] = ()  # the script's arguments
    options: tuple[str, ...] = ()  # sbatch options on the command line: --array=0-3, --nodes=2
    directives: tuple[str, ...] = ()  # extra `#SBATCH` lines of a generated script: --gpus-per-node=1
    job_name: Optional[str] = None  # default: the stage's name


@dataclass
class Stage:
    """One step of a workflow. Its commands run in order (or at once where `concurrent`: independent
    commands that are mostly interpreter start-up). In-process work the local runner does around them
    (`prepare` before, `result` after, returning the stage's numbers) has no batch-job form, so the
    Slurm runner refuses such a stage."""
    name: str
    commands: tuple[Command, ...] = ()
    needs: tuple[str, ...] = ()  # names of the stages whose outputs it reads (the graph's edges)
    inputs: tuple[str, ...] = ()  # paths it reads that no stage of the graph makes
    outputs: tuple[str, ...] = ()  # paths it makes
    settings: Any = None  # what its done-key hashes (JSON-able; `default=str` for the rest)
    concurrent: bool = False
    prepare: Optional[Callable[[], None]] = None
    result: Optional[Callable[[], dict]] = None
    slurm: SlurmJob = field(default_factory=SlurmJob)
    about: str = ""  # one line for the submit script's comment

    def __post_init__(self):
        self.commands, self.needs = tuple(self.commands), tuple(self.needs)
        self.inputs, self.outputs = tuple(str(p) for p in self.inputs), tuple(str(p) for p in self.outputs)
        if not self.name or any(c.isspace() or c in "/\"'$`\\" for c in self.name):
            raise WorkflowError(f"stage name {self.name!r}: it names files and jobs, so no spaces, quotes or slashes")
        if not self.commands and self.result is None and self.slurm.script is None:
            raise WorkflowError(f"stage {self.name!r} has nothing to run (no command, result or Slurm script)")


class Graph:
    """Stages in dependency order: each stage comes after every stage it needs. Checked when built, so a
    runner never starts a graph that cannot finish."""

    def __init__(self, stages: list[Stage]):
        self.stages = list(stages)
        self._by_name: dict[str, Stage] = {}
        for st in self.stages:
            if st.name in self._by_name:
                raise WorkflowError(f"two stages are named {st.name!r}")
            self._by_name[st.name] = st
        for st in self.stages:
            unknown = [n for n in st.needs if n not in self._by_name]
            if unknown:
                raise WorkflowError(f"stage {st.name!r} needs {', '.join(map(repr, unknown))}, which no stage of "
                                    f"the graph is (stages: {', '.join(self._by_name)})")
        cycle = self._cycle()
        if cycle:
            raise WorkflowError(f"the stages depend on each other in a cycle: {' → '.join(cycle)}")
        seen: set[str] = set()
        for st in self.stages:  # the runners take the stages as listed, so the list must be an order
            late = [n for n in st.needs if n not in seen]
            if late:
                raise WorkflowError(f"stage {st.name!r} is listed before {', '.join(map(repr, late))}, which it needs")
            seen.add(st.name)

    def _cycle(self) -> list[str]:
        """A dependency cycle as [a, b, ..., a], or [] (depth-first search over `needs`)."""
        state: dict[str, int] = {}  # 1: on the current path, 2: finished
        path: list[str] = []

        def visit(name: str) -> list[str]:
            state[name] = 1
            path.append(name)
            for dep in self._by_name[name].needs:
                if state.get(dep) == 1:
                    return path[path.index(dep):] + [dep]
                if dep not in state:
                    found = visit(dep)
                    if found:
                        return found
            path.pop()
            state[name] = 2
            return []

        for st in self.stages:
            if st.name not in state:
                found = visit(st.name)
                if found:
                    return found
        return []

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, name: str) -> Stage:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [st.name for st in self.stages]

    def needed_by(self, name: str) -> list[str]:
        """The stages that need `name` (the edges the other way)."""
        return [st.name for st in self.stages if name in st.needs]
