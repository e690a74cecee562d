"""Model-parallel process groups: megatron-core's ``parallel_state`` in DeepSpeed's rank order.

Ranks are laid out tensor-fastest, then data, then pipeline: global rank
``r = tp_rank + tp·(dp_rank + dp·pp_rank)``. This is the layout of DeepSpeed's
``PipeModelDataParallelTopology`` (axes pipe, data, model; the last axis varies fastest) and of
megatron-core's ``order="tp-cp-ep-dp-pp"`` with context and expert parallelism of size 1 (megatron's
order string lists the fastest-varying dimension first). ``init_model_parallel`` creates megatron's
groups and checks, on every rank, that each of its tensor, data and pipeline groups is exactly the
group DeepSpeed's topology would form; a mismatch stops the run on every rank with one message.

``DeepSpeedMPU`` adapts ``parallel_state`` to the ``mpu`` interface ``deepspeed.initialize`` expects
(megatron-core dropped the legacy ``get_model_parallel_rank/world_size`` DeepSpeed still calls).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

# megatron-core 0.16.1's order string: fastest-varying dimension first.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class ParallelCoords:
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def describe(self) -> str:
        """The groups part of the per-rank start line."""
        return (f"tp {self.tp_rank}/{self.tp_size} dp {self.dp_rank}/{self.dp_size} "
                f"pp {self.pp_rank}/{self.pp_size}")


@dataclass(frozen=True)
class ParallelLayout:
    """How a run's ranks are arranged: tensor x pipeline x data parallel (the sizes, not a rank)."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @classmethod
    def of(cls, tensor: int, pipeline: int, world_size: int) -> "ParallelLayout":
        """Data parallel is what TP × PP leave of the world; refused when they do not divide it."""
        if tensor < 1 or pipeline < 1 or world_size % (tensor * pipeline):
            raise ValueError(f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline = "
                             f"{tensor} × {pipeline}; launch a multiple of {tensor * pipeline} ranks")
        return cls(tensor, pipeline, world_size // (tensor * pipeline))

    @classmethod
    def of_run(cls, parallel, world_size: int) -> "ParallelLayout":
        """From a config's ``parallel`` section, or its dict in a saved run (which may predate some keys)."""
        get = parallel.get if isinstance(parallel, dict) else (lambda key, default: getattr(parallel, key))
        return cls.of(get("tensor", 1), get("pipeline", 1), world_size)

    def __str__(self) -> str:
        return f"TP={self.tensor} PP={self.pipeline} DP={self.data}"


def deepspeed_topology(tp: int, pp: int, world_size: int):
    """DeepSpeed's 3-D topology for this layout (the one its pipeline engine would use)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=ParallelLayout.of(tp, pp, world_size).data)


def current_coords() -> ParallelCoords:
    from megatron.core import parallel_state as ps

    return ParallelCoords(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size())


def init_model_parallel(tp: int, pp: int = 1, timeout_minutes: float = 30.0) -> ParallelCoords:
    """Create megatron-core's groups for TP=tp × PP=pp (data parallel = the rest) on the default
    process group (already initialised: ``distributed.init_distributed``), check them against DeepSpeed's
    topology and return this rank's coordinates. Calling it again with the same sizes is a no-op."""
    from calm_pretrain.parallel import mcore_shim

    mcore_shim.apply()
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("init_model_parallel: torch.distributed is not initialised (call init_distributed first)")
    ParallelLayout.of(tp, pp, dist.get_world_size())  # refuses sizes that do not divide the world
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise RuntimeError(f"model-parallel groups already exist with TP×PP = {have[0]}×{have[1]}, "
                               f"asked for {tp}×{pp}")
        return current_coords()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, order=MEGATRON_ORDER,
        distributed_timeout_minutes=int(max(1, round(timeout_minutes))),
        create_gloo_process_groups=False)  # gloo groups serve megatron's own distributed optimizer only
    check_groups_match_deepspeed(tp, pp)
    return current_coords()


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def check_groups_match_deepspeed(tp: int, pp: int) -> None:
    """Raise on every rank if megatron's tensor/data/pipeline groups differ from DeepSpeed's."""
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    topo = deepspeed_topology(tp, pp, world)
    coord = topo.get_coord(rank)
    problems = []
    for axis, group, mine in (("model", ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()),
                              ("data", ps.get_data_parallel_group(), ps.get_data_parallel_rank()),
                              ("pipe", ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank())):
        ds_group = next(sorted(g) for g in topo.get_axis_comm_lists(axis) if rank in g) \
            if topo.get_dim(axis) > 1 else [rank]
        if _ranks(group) != ds_group or mine != getattr(coord, axis):
            problems.append(f"rank {rank}: megatron-core {axis} group {_ranks(group)} (rank {mine}) but DeepSpeed "
                            f"{ds_group} (rank {getattr(coord, axis)})")
    everyone = [None] * world
    dist.all_gather_object(everyone, problems)
    problems = [p for ps_ in everyone for p in ps_]
    if problems:
        raise RuntimeError("megatron-core's process groups do not match DeepSpeed's topology (tensor fastest, "
                           "then data, then pipeline); gradients would be reduced over the wrong ranks:\n  "
                           + "\n  ".join(problems))


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


class DeepSpeedMPU:
    """``parallel_state`` as DeepSpeed's ``mpu``: "model parallel" is megatron's model-parallel group
    (TP × PP; equal to the tensor group when PP = 1), so DeepSpeed reduces gradient norms over it and
    counts a replicated parameter once (on model-parallel rank 0), a tensor-parallel one on every rank.
    It deliberately has no ``initialize_sequence_parallel`` (DeepSpeed would then ignore the groups)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # model parallel (TP × PP)
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._ps.get_model_parallel_group())

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline
    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    # data parallel
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return _ranks(self._ps.get_data_parallel_group())


def tensor_parallel_seed(base_seed: int, coords: ParallelCoords) -> int:
    """The per-rank seed for training noise (energy-head noise, AE masking): equal on the ranks of a
    tensor-parallel group — they compute one replica, so its replicated head must see one noise draw —
    and different across data-parallel replicas (and pipeline stages draw nothing shared)."""
    return base_seed * 1_000_003 + coords.dp_rank


__all__ = ["ParallelCoords", "ParallelLayout", "init_model_parallel", "check_groups_match_deepspeed", "current_coords",
           "deepspeed_topology", "DeepSpeedMPU", "destroy_model_parallel", "tensor_parallel_seed",
           "MEGATRON_ORDER"]
