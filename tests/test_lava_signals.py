"""A killed Lava run leaves nothing behind: no process of the worker's group, no temporary folder, no shared memory.

``stata-deploy run FILE.nir --runtime lava`` runs as a subprocess with TMPDIR pointed at a fresh folder of the test
(so "nothing left" is exact: the folder must end empty) and ``STATA_LAVA_TEST_HANG=1``: the worker blocks inside its
first run request once Lava has started (processes and shared memory exist) and writes ``hang`` into its temporary
folder. The signal is sent only then, so it always lands mid-run, however fast or slow the machine.
SIGTERM / SIGHUP: the CLI kills the group itself (``Terminated``) and exits 128 + signum with one line;
SIGKILL: the worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and cleans up its group, memory and folder.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

needs_lava = pytest.mark.skipif(importlib.util.find_spec("lava") is None,
                                reason="Lava is not installed (bash scripts/install_lava.sh .venv)")


@pytest.fixture(scope="module")
def small_nir(tmp_path_factory):
    """A lively depth-1 SSA model (every layer fires; one block keeps the build short) as a .nir file."""
    from exporters.nir_exporter import NirExporter
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.testing import liven_batchnorm

    torch.manual_seed(0)
    model = liven_batchnorm(build_model(make_config("spikformer-tiny", attention="ssa", depth=1)).eval(), 0)
    path = tmp_path_factory.mktemp("nir") / "d1.nir"
    NirExporter().export(model, None, path)
    return path


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _wait_for(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


@needs_lava
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_lava_run_leaves_nothing_behind(small_nir, tmp_path_factory, sig):
    tmp = tmp_path_factory.mktemp("tmp")  # short: multiprocessing's socket path inside it must fit 108 bytes
    env = dict(os.environ, TMPDIR=str(tmp), STATA_LAVA_TEST_HANG="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stata_deploy", "run", str(small_nir), "--runtime", "lava", "--dataset", "digits",
           "--limit", "4", "--json"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        marker = _wait_for(lambda: p.poll() is not None or next(tmp.glob("stata-lava-*/hang"), None), 120, 0.1)
        assert isinstance(marker, Path), f"the run ended before the worker hung: {p.communicate()}"
        folder, pgid = marker.parent, int(marker.read_text())
        shm = [n for n in (folder / "spec.json.shm").read_text().split() if n]
        assert shm and all(os.path.exists(f"/dev/shm/{n}") for n in shm), "Lava has not started"
        members = _group_members(pgid)
        assert pgid in members and len(members) > 3, members  # the worker, Lava's processes, its memory manager
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=10)
        assert _wait_for(lambda: not _group_members(pgid), 10 - (time.monotonic() - t0)), _group_members(pgid)
        assert _wait_for(lambda: not list(tmp.iterdir()), 10 - (time.monotonic() - t0)), list(tmp.rglob("*"))
        assert not [n for n in shm if os.path.exists(f"/dev/shm/{n}")]
        elapsed = time.monotonic() - t0
        print(f"\n{sig.name}: {len(members)} processes, {len(shm)} shared-memory segments gone in {elapsed:.2f} s")
        if sig == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL
        else:
            assert p.returncode == 128 + sig, (p.returncode, err)
            assert err.decode().splitlines() == [f"terminated ({sig.name})"], err
            assert out == b""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@needs_lava
def test_worker_cleans_up_itself_when_its_input_ends(small_nir, digits):
    """The parent vanishes between requests (its end of the pipe closes): the worker exits without Lava's stop(),
    taking its group, shared memory and temporary folder with it; nobody else cleans up."""
    from runtimes.lava_runtime import LavaRuntime

    rt = LavaRuntime(small_nir, batch=4, timeout=120)
    try:
        rt.run(digits.x_test[:4])  # Lava started: processes and shared memory exist
        w = rt._worker
        shm = [n for n in Path(str(w.spec_path) + ".shm").read_text().split() if n]
        assert shm and len(_group_members(w.pgid)) > 3
        w.proc.stdin.close()
        assert _wait_for(lambda: not _group_members(w.pgid), 10), _group_members(w.pgid)
        assert w.proc.wait(10) == -signal.SIGKILL  # it killed its own group, itself included
        assert not w.dir.exists()
        assert not [n for n in shm if os.path.exists(f"/dev/shm/{n}")]
    finally:
        rt.close()
