"""Workflows as data: one description of a stage and two runners of the same graph.

  stage.py  Stage (name, commands, the stages it needs, inputs, outputs, the settings its done-key
            hashes), Command (`python -m ...`, processes, threads), SlurmJob (how Slurm submits it),
            Graph (the stages in dependency order; an unknown dependency, a cycle or a duplicate name
            is one WorkflowError)
  local.py  LocalRunner: each stage once, here, behind `<name>.done.json` markers keyed by a chained
            settings hash (SettingsChanged), its commands as subprocesses (run_command)
  slurm.py  SlurmRunner: the graph as batch scripts chained with `sbatch --dependency=afterok:`, from
            the templates in slurm/templates/

The main job (calm_pretrain/demo/) and the sweep (calm_pretrain/sweep/) build their graphs from it.
A library of the workflows: it imports nothing of ours but the io module (data_pipeline/files.py, for
atomic markers), and torch (to tell a CPU-only machine, where the commands run with DS_ACCELERATOR=cpu);
what it runs, it runs as commands.
"""
from calm_pretrain.workflow.local import CommandFailed, LocalRunner, SettingsChanged, chain_key, run_command
from calm_pretrain.workflow.slurm import SlurmRunner, job_variable, render, shell_command
from calm_pretrain.workflow.stage import Command, Graph, SlurmJob, Stage, WorkflowError

__all__ = ["Command", "CommandFailed", "Graph", "LocalRunner", "SettingsChanged", "SlurmJob", "SlurmRunner", "Stage",
           "WorkflowError", "chain_key", "job_variable", "render", "run_command", "shell_command"]
