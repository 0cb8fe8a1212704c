"""Where training runs: the device, the numeric precision and the process group under torchrun.

`resolve_device` applies `aet.devices`' rule (the one the server uses) plus torch's own check.
`ProcessGroup.from_environment` joins the group `torchrun` describes in its environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`; gloo on CPU, NCCL on CUDA); without torchrun it is the
single process, rank 0 of 1. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aet.config import ConfigError
from aet.devices import DEVICES, nvidia_device_node_present, nvidia_gpu_present

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_usable() -> bool:
    """An NVIDIA GPU is there (`aet.devices`) and this torch build can use it."""
    return nvidia_gpu_present() and torch.cuda.is_available()


def resolve_device(device: str, local_rank: int = 0, usable: bool | None = None) -> torch.device:
    """`auto`: CUDA when usable, else CPU; `cuda`: CUDA or a ConfigError; `cpu`: CPU.

    Under torchrun each process takes GPU `local_rank`. `usable` overrides the probe (tests).
    """
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}; got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    usable = cuda_usable() if usable is None else usable
    if not usable:
        if device == "cuda":
            raise ConfigError(
                "device: expected a usable CUDA GPU for 'cuda', got none (torch CUDA build: "
                f"{torch.version.cuda is not None}, torch.cuda.is_available(): "
                f"{torch.cuda.is_available()}, NVIDIA device node: {nvidia_device_node_present()})"
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `precision`; fp16 needs CUDA (bf16 autocasts on CPU too)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision: fp16 needs a CUDA device; training runs on {device}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> ProcessGroup:
        """Join torchrun's group when `WORLD_SIZE` > 1 (once per process), else rank 0 of 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        group = cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            on_cuda = resolve_device(device, group.local_rank).type == "cuda"
            if on_cuda:
                torch.cuda.set_device(group.local_rank)
            dist.init_process_group("nccl" if on_cuda else "gloo")
        return group

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the processes (itself when alone)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def from_main(self, value: float) -> float:
        """Rank 0's `value` on every process, so that all take the same decisions."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process gets here (at once when alone)."""
        if self.distributed:
            dist.barrier()

    def leave(self, *, together: bool = True) -> None:
        """Leave torchrun's group (once; later calls do nothing). `together`, the normal end:
        after a barrier, so that every process destroys the group at the same point, as torch
        requires (a process that left early has aborted under gloo). Not together, after a
        failure: at once, as the others may be waiting in another collective."""
        if not (self.distributed and dist.is_initialized()):
            return
        if together:
            self.barrier()
        dist.destroy_process_group()

    def gather(self, value: object) -> list:
        """Every process's `value`, in rank order (on every process)."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values
