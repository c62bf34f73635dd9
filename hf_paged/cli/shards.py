"""Data parallelism: ``accelerate launch`` of the same command splits the prompts between processes.

    accelerate launch --num_processes 2 -m hf_paged generate --prompts data.jsonl --output out.jsonl
    accelerate launch --multi_gpu --num_processes 2 -m hf_paged generate --device cpu ...   # CPU processes

(``accelerate launch --cpu`` starts ONE process whatever ``--num_processes`` says, unless given an
MPI hostfile: its CPU launcher is mpirun. ``--multi_gpu`` starts them through torchrun on any
machine; on the CPU they meet over gloo.)

Each process (rank) takes every ``count``-th prompt still to do, runs its own engine (or static
batches) on its own device (``PartialState().device``) and appends its records to its own part file
next to the output, ``out.jsonl.part-<rank>-of-<count>``. When every process is done, rank 0
merges the part files (and, with ``--resume``, the earlier output) into ``out.jsonl`` in input order
and removes them. ``--resume`` reads the output and every part file, whatever number of processes
wrote them. accelerate is the launcher: a run started without it is one process and never imports
accelerate.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass


@dataclass
class Shard:
    """This process's place in the run: ``rank`` of ``count`` (0 of 1 without a launcher)."""

    rank: int = 0
    count: int = 1
    state: object | None = None  # accelerate.PartialState of a launched run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.count}"

    def take(self, indices: list[int]) -> list[int]:
        """This process's share of ``indices`` (round robin: each process gets long and short prompts)."""
        return list(indices)[self.rank::self.count]

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order (every process gets the list)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


def current_shard(device: str = "auto") -> Shard:
    """The launcher's processes (``WORLD_SIZE`` > 1: accelerate launch, torchrun), else one process.

    ``device``: the --device asked for. A CPU run says so to ``PartialState(cpu=True)``: without it
    accelerate sees no accelerator backend and takes each process for a run of its own (every
    process would then do every prompt); with it, the processes meet over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    cpu = (device == "cpu" or (device == "auto" and not torch.cuda.is_available())
           or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise RuntimeError(f"hf_paged: launched as {world} processes (WORLD_SIZE) but accelerate sees "
                           f"{state.num_processes} ({state.distributed_type}): the prompts would not be split")
    return Shard(state.process_index, state.num_processes, state)


def part_path(output: str, rank: int, count: int) -> str:
    return f"{output}.part-{rank}-of-{count}"


def part_files(output: str) -> list[str]:
    """The part files next to ``output`` (of any earlier number of processes), sorted."""
    return sorted(glob.glob(glob.escape(output) + ".part-*-of-*"))
