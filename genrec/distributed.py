"""Multi-process runs without Lightning: the launch environment, the process group, and the few collectives the
continual loop needs between its Trainers (rank 0 writes, the others wait; rank 0's small results reach every rank).

A run is distributed when a launcher set ``WORLD_SIZE`` > 1 (torchrun, ``genrec continual --continual.devices N``
through :func:`spawn`, SLURM via ``SLURM_NTASKS``). Everything here is a no-op in a one-process run.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

# Generous: rank 0 alone prepares data and encodes item texts (minutes to hours on a large catalogue) while the
# other ranks wait at the first barrier.
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("GENREC_DIST_TIMEOUT_HOURS", "6")))


def launched_world() -> int:
    """Processes of this launch according to the environment (1 when not launched by a distributed launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if world() > 1 else 0


def local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world())) or world())


def is_main() -> bool:
    return rank() == 0


def init(use_cuda: bool) -> bool:
    """Join the launch's process group (env:// rendezvous) once; True when this is a multi-process run. CPU
    collectives use gloo; with CUDA, tensors on the GPU use NCCL (one device per local rank)."""
    if launched_world() <= 1:
        return False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return True


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (picklable: tensors, dicts, numpy arrays)."""
    if world() <= 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], nprocs: int, module: str = "genrec") -> int:
    """Run ``python -m <module> <argv>`` as ``nprocs`` local processes of one process group (what torchrun does on
    one node) and wait; when one fails the others are stopped. Returns the first non-zero exit code, else 0."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs),
           "LOCAL_WORLD_SIZE": str(nprocs), "NODE_RANK": "0", "GROUP_RANK": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nprocs)]
    code = 0
    try:
        while procs and code == 0:
            for p in list(procs):
                rc = p.poll()
                if rc is not None:
                    procs.remove(p)
                    code = code or rc
            time.sleep(0.2)
    finally:
        for p in procs:  # a failed rank (or Ctrl-C): the others would wait at a barrier forever
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return code
