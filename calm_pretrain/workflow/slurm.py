"""The Slurm runner: a graph written as batch jobs chained with `sbatch --dependency=afterok:`, from the
templates in slurm/templates/: `submit.sh` (every stage in the graph's order, each waiting for the jobs
of the stages it needs) and, for a stage run by its commands, a one-task script `stages/<name>.sbatch`
(`stage.sbatch`). A stage with a batch script of the repository (slurm/sweep.sbatch, encode.sbatch) is
submitted through that script instead. Nothing here calls sbatch: `bash DIR/submit.sh` does.

The templates live next to the slurm/*.sbatch scripts they submit, and the generated submit.sh runs
those from the repository root, so the scripts are always written from (and for) a checkout."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional

from calm_pretrain.workflow.stage import Command, Graph, Stage, WorkflowError

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm" / "templates"


def render(template: str, **values: str | list[str]) -> str:
    """The template file with each @KEY@ replaced: a string in place, a list of lines for a line that is
    only @KEY@ (no lines: the line goes)."""
    out = []
    for line in (TEMPLATES / template).read_text().splitlines():
        key = line[1:-1] if line.startswith("@") and line.endswith("@") else None
        if key in values and isinstance(values[key], list):
            out += values[key]
            continue
        for name, value in values.items():
            if isinstance(value, str):
                line = line.replace(f"@{name}@", value)
        out.append(line)
    return "\n".join(out) + "\n"


def job_variable(name: str) -> str:
    """The shell variable of submit.sh that holds a stage's job id."""
    return "JOB_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def shell_command(c: Command) -> str:
    """A command as the line of a batch script: the interpreter the Slurm knobs name (PYTHON), torchrun
    for several processes on the node, as the local runner runs it."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c.processes)] \
        if c.processes > 1 else []
    threads = f"OMP_NUM_THREADS={c.threads} " if c.threads else ""
    return threads + '"${PYTHON:-python3}" ' + " ".join(shlex.quote(a) for a in [*launch, "-m", *c.argv])


class SlurmRunner:
    """Writes a graph's batch scripts into `out` (the submit script's $PLAN): submit.sh, stages/*.sbatch.
    `title` and `generated_by` go in the scripts' headers, `next_step` is echoed once all is submitted."""

    def __init__(self, out: Path, title: str, generated_by: str, next_step: Optional[str] = None):
        self.out, self.title, self.generated_by, self.next_step = Path(out), title, generated_by, next_step

    def write(self, graph: Graph) -> Path:
        """The scripts of every stage and submit.sh; returns submit.sh's path."""
        variables: dict[str, str] = {}
        for st in graph:
            if st.prepare is not None or st.result is not None:
                raise WorkflowError(f"stage {st.name!r} does in-process work (prepare/result) that a batch job "
                                    "cannot do: give it a command or a Slurm script instead")
            var = job_variable(st.name)
            if var in variables.values():
                raise WorkflowError(f"stage {st.name!r}: its job variable {var} is another stage's too; rename one")
            variables[st.name] = var
        lines: list[str] = []
        for st in graph:
            lines += self._submit_lines(st, variables, needed=bool(graph.needed_by(st.name)))
        while lines and not lines[-1]:
            lines.pop()  # the template has its own blank line after the stages
        submit = self.out / "submit.sh"
        next_lines = [f'echo "submitted; {self.next_step}"'] if self.next_step else []
        _write_executable(submit, render("submit.sh", TITLE=self.title, GENERATED_BY=self.generated_by,
                                         PLAN=shlex.quote(str(self.out)), REPO=shlex.quote(str(REPO)),
                                         STAGES=lines, NEXT=next_lines))
        return submit

    def _submit_lines(self, st: Stage, variables: dict[str, str], needed: bool) -> list[str]:
        job = st.slurm
        if job.script is not None:
            script = [job.script, *(self._word(a) for a in job.args)]
        else:
            script = [self._word(str(self.write_stage_script(st)))]
        array = any(o.startswith("--array") for o in job.options)
        words = [f"submit {st.name}"]
        if st.needs:
            words.append("--dependency=afterok:" + ":".join(f'"${variables[n]}"' for n in st.needs))
        words += [*job.options, f"--job-name={job.job_name or st.name}",
                  f'--output="$PLAN/logs/{st.name}-{"%A_%a" if array else "%j"}.out"', *script]
        # Only a job some later stage waits for keeps its id: an unused variable is a shellcheck warning.
        return (["# " + st.about.replace("\n", "\n# ")] if st.about else []) + [" ".join(words)] \
            + ([f"{variables[st.name]}=$JOB"] if needed else []) + [""]

    def write_stage_script(self, st: Stage) -> Path:
        """stages/<name>.sbatch: one task that runs the stage's commands one after another (commands the
        local runner may run at once only save start-up time there)."""
        if not st.commands:
            raise WorkflowError(f"stage {st.name!r} has no command to put in a batch script")
        path = self.out / "stages" / f"{st.name}.sbatch"
        comment = (st.about or f"Stage {st.name}").replace("\n", "\n# ")
        _write_executable(path, render("stage.sbatch", COMMENT=comment, GENERATED_BY=self.generated_by,
                                       JOB_NAME=st.slurm.job_name or st.name,
                                       SBATCH=[f"#SBATCH {d}" for d in st.slurm.directives],
                                       COMMAND=[shell_command(c) for c in st.commands]))
        return path

    def _word(self, arg: str) -> str:
        """An argument of submit.sh: a path in the output directory as "$PLAN/...", so the script reads
        as the directory it submits; anything else quoted for the shell."""
        p = Path(arg)
        if p.is_absolute() and (p == self.out or self.out in p.parents):
            rel = p.relative_to(self.out).as_posix()
            tail = "" if rel == "." else "/" + re.sub(r'(["$`\\])', r"\\\1", rel)
            return f'"$PLAN{tail}"'
        return shlex.quote(arg)


def _write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
