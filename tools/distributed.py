"""torchrun support: process group set-up, rank checks and gathering results by row index.

Under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised with NCCL on GPUs and gloo on
the CPU; a single process needs none of this and behaves as if world size were 1.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> str:
    """Initialise the process group when launched by torchrun; returns the device to use
    (``cuda:<local_rank>`` for GPU ranks)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device_name
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device_name


def shutdown(succeeded: bool) -> None:
    """End the process group. After a run that succeeded every rank first waits for the others:
    ranks finish at different times (rank 0 alone writes the files), and a rank tearing gloo down
    while another still holds the connection could abort. After a failure no rank waits or tears
    down (a collective teardown can hang); the process exits and torchrun stops the others."""
    if not (succeeded and dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(index: np.ndarray, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Put each rank's rows back in table order. DistributedSampler pads the last shard with
    repeated rows; those duplicates are dropped, so every row appears exactly once."""
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, (index, arrays))
        index = np.concatenate([p[0] for p in parts])
        arrays = {k: np.concatenate([p[1][k] for p in parts]) for k in arrays}
    _, first = np.unique(index, return_index=True)
    if len(first) != n:
        raise RuntimeError(f"gathered {len(first)} distinct rows, expected {n}")
    order = first[np.argsort(index[first])]
    return {k: v[order] for k, v in arrays.items()}


def sum_across_ranks(*values: float) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves in one process)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
