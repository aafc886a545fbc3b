"""Data-parallel plumbing on torch.distributed (DistributedDataParallel, gloo on CPU, nccl with CUDA).

Two ways to start a multi-process run, both on PyTorch's own engine:

    torchrun --nproc_per_node=2 -m stata_deploy train --out runs/ddp ...
    stata-deploy train --nproc 2 --out runs/ddp ...          # spawns the same processes itself (see ``launch``)

Semantics (see ``train.train``):
- ``--batch-size`` is the GLOBAL batch. Every rank draws the same permutation of the training set from the same
  seeded generator (as a single process does), cuts it into the same global batches, and takes its own contiguous
  shard of each global batch (``shard``). This is DistributedSampler's job, done per global batch so that the data
  order and the batches are exactly those of a single-process run with the same batch size.
- Each rank's loss is scaled by ``world * n_local / n_global``; DDP averages gradients over ranks, so the gradient is
  the gradient of the mean loss over the global batch, as in one process (BatchNorm statistics are per rank, as in
  any DDP run without SyncBatchNorm, so the result is equal within noise, not bitwise).
- The random token scorer uses a per-rank generator (seed + 1 + 7919 * rank): each rank scores different images,
  so independent streams are what a single process would do too; rank 0's stream equals the single-process one.
- Only rank 0 writes checkpoints, metrics and logs; metrics are summed over ranks with all_reduce.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import StataError

RANDOM_SCORER_RANK_STRIDE = 7919


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True if this module initialised the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise StataError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device_name: str = "auto", timeout_s: float = 600.0) -> tuple[DistEnv, torch.device]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Without it (or with WORLD_SIZE=1) this is a single process. Returns the env and the device."""
    world = env_world_size()
    if dist.is_available() and dist.is_initialized():
        env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    elif world > 1:
        if not dist.is_available():
            raise StataError("this torch build has no torch.distributed support")
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise StataError(f"cannot join the {backend} process group (rank {rank}/{world}): "
                             f"{str(e).splitlines()[0]}") from None
        env = DistEnv(rank, world, local, True)
    else:
        env = DistEnv()
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return env, device


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, stop) of rank's part of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_part(sel, rank: int, world: int):
    """This rank's indices of one global batch ``sel`` and the weight of each (1.0 real, 0.0 padding).

    Every rank must run forward/backward each step (DDP all-reduces gradients), so when a final global batch has
    fewer images than ranks, empty ranks repeat an image with weight 0 (it adds nothing to the gradient)."""
    import numpy as np

    if world == 1:
        return sel, np.ones(len(sel), dtype=np.float32)
    a, b = shard(len(sel), rank, world)
    if b > a:
        return sel[a:b], np.ones(b - a, dtype=np.float32)
    return sel[:1], np.zeros(1, dtype=np.float32)


def wrap(model: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running on several processes, else the model itself.

    find_unused_parameters=True: with token pruning and alignment losses a configuration may leave some parameter
    without a gradient, which plain DDP reports as an error; the extra graph walk per step is cheap at these sizes.
    (static_graph=True was tried and rejected: on this model it produced wrong gradients, max abs error 0.13 against
    the single-process gradient of the same global batch, while find_unused_parameters matches to 5e-8.)"""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=True)


def all_sum(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_true(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """True if ``flag`` holds on every rank (so all ranks stop together instead of hanging in a collective)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_buffers(env: DistEnv, model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, e.g. before evaluation."""
    if not env.enabled:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Launcher for `stata-deploy train --nproc N` (torchrun's job for the single-node case, with one-line errors).

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(src, dst) -> None:
    """Copy a child's output to our (Python-level) stream as it arrives, progress-bar carriage returns included."""
    while True:
        chunk = os.read(src.fileno(), 4096)
        if not chunk:
            break
        dst.write(chunk.decode(errors="replace"))
        dst.flush()


def launch(nproc: int, argv: list[str], threads: int | None = None) -> int:
    """Run ``python -m stata_deploy <argv>`` in ``nproc`` processes with torchrun's environment variables.

    Rank 0's output is forwarded; the other ranks' stderr is shown only if they fail where rank 0 did not.
    When any rank fails the others get a short grace period and are then stopped. Returns the exit code."""
    import threading
    import time

    port = free_port()
    procs, logs, pumps = [], [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads or 1))
        cmd = [sys.executable, "-m", "stata_deploy", *argv]
        if rank == 0:
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            pumps += [threading.Thread(target=_pump, args=(p.stdout, sys.stdout), daemon=True),
                      threading.Thread(target=_pump, args=(p.stderr, sys.stderr), daemon=True)]
            for t in pumps:
                t.start()
            logs.append(None)
        else:
            log = tempfile.TemporaryFile()
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            logs.append(log)
        procs.append(p)
    ours: set[int] = set()  # ranks we stopped
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                grace = time.monotonic() + 3.0
                while time.monotonic() < grace and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        ours.add(i)
                        p.terminate()
                for p in procs:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        raise
    finally:
        for t in pumps:
            t.join(5)
        codes = [p.returncode for p in procs]
        rank0_spoke = codes[0] not in (0, None) and 0 not in ours
        for i, log in enumerate(logs):
            if log is None:
                continue
            if codes[i] not in (0, None) and i not in ours and not rank0_spoke:
                log.seek(0)
                msg = log.read().decode(errors="replace").strip().splitlines()
                sys.stderr.write(f"rank {i}: {msg[-1] if msg else f'exit code {codes[i]}'}\n")
            log.close()
    bad = [c for i, c in enumerate(codes) if c not in (0, None) and i not in ours]
    if not bad:
        return 0
    return bad[0] if bad[0] > 0 else 1
