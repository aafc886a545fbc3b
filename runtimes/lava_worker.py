"""The Lava simulation child process (numpy + lava only: never imports torch or stata_deploy).

``python -m runtimes.lava_worker SPEC.json`` builds the network described by SPEC (written by
``runtimes.lava_runtime``: JSON whose arrays live in the .npz file it names, read with ``allow_pickle=False``; see
``decode_spec``) once, then serves requests on stdin, one JSON line each::

    {"cmd": "run", "x": "in.npy", "out": "out.npz"}   ->  {"ok": true, "steps": n, "seconds": s, ...}
    {"cmd": "stop"}                                    ->  stops Lava and exits
    end of input (the parent is gone)                  ->  cleans up (below), exits without Lava's stop() (can hang)

``x`` is (K, T, Bc, *input_shape): K chunks of Bc samples, streamed back to back with period T (pipelined), plus
enough zero steps to drain the deepest lag. ``out`` holds, per recorded layer, (T, K * Bc, ...) aligned to model
timesteps (the lag of each layer removed; in fixed point the integers times the layer's ``record_grids`` entry).
The spec's ``select_tag`` (``floating_pt`` | ``fixed_pt``) selects the process models (``Network.run_cfg``).
Errors are reported as {"ok": false, "error": "..."} on stdout.

Every shared-memory segment this process tree creates is logged to ``SPEC.shm`` (one name a line) before it is
created, so that whoever kills the process group can unlink them.

Dying with the parent (Linux): the parent (``_Worker``) starts this process as the leader of its own process group
(Lava forks every child into that group) with ``STATA_LAVA_PARENT`` = its pid. At startup the worker asks the
kernel for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``; note: the parent *thread*, the one that
started it) and then checks that the parent is still alive (it may have died before). On SIGTERM / SIGHUP and on
end of input it unlinks every logged segment, removes the spec's temporary folder (``stata-lava-*``), and SIGKILLs
its whole process group, itself included (PDEATHSIG is not inherited by forked children: the group kill is what
reaches them). Forked children get the default signal actions back.

Test hooks: ``{"cmd": "crash"}`` raises inside the serving loop; ``{"cmd": "hang"}`` blocks without reading more
input until killed; with ``STATA_LAVA_TEST_HANG=1`` every run request blocks once Lava has started (its processes
and shared memory exist). Both write ``hang`` (this pid) into the spec's folder when they start blocking.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback

import numpy as np


TEMP_PREFIX = "stata-lava-"  # the parent's temporary folder (spec, stderr, requests); removed on every kill path
SPEC_FORMAT = "stata-lava-spec/1"
TAG_TUPLE, TAG_ARRAY, TAG_CSR = "__tuple__", "__ndarray__", "__csr__"  # one-key dicts in the spec's JSON
SPEC_TAGS = (TAG_TUPLE, TAG_ARRAY, TAG_CSR)
PR_SET_PDEATHSIG = 1


def decode_spec(path: str) -> dict:
    """The spec ``runtimes.lava_runtime._write_spec`` wrote: JSON with arrays as {"__ndarray__": key} (entries of
    one .npz, read without pickle), scipy.sparse CSR matrices as {"__csr__": {data, indices, indptr, shape}} and
    tuples as {"__tuple__": [...]}. An array referenced twice is decoded to one shared array."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: not a Lava worker spec ({SPEC_FORMAT})")
    with np.load(os.path.join(os.path.dirname(os.path.abspath(path)), doc["arrays"]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}

    def dec(o):
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if len(o) == 1:
                (tag, v), = o.items()
                if tag == TAG_TUPLE:
                    return tuple(dec(e) for e in v)
                if tag == TAG_ARRAY:
                    return arrays[v]
                if tag == TAG_CSR:
                    import scipy.sparse as sp  # a Lava dependency

                    return sp.csr_matrix((arrays[v["data"]], arrays[v["indices"]], arrays[v["indptr"]]),
                                         shape=tuple(v["shape"]))
            return {k: dec(e) for k, e in o.items()}
        return o

    return dec(doc["spec"])


def _read_lines(p: str) -> list[str]:
    try:
        with open(p) as f:
            return [s for s in f.read().split() if s]
    except OSError:
        return []


def _log_shared_memory(log_path: str) -> None:
    """Append the name of every SharedMemory segment created in this process tree to ``log_path`` *before* it is
    created (fork inherits the patch), so a kill at any moment leaves no unlogged segment."""
    from multiprocessing import shared_memory

    orig = shared_memory.SharedMemory.__init__
    make_name = getattr(shared_memory, "_make_filename", None)

    def log(name):
        with open(log_path, "a") as f:
            f.write(name.lstrip("/") + "\n")

    def init(self, name=None, create=False, size=0):
        if not create or (name is None and make_name is None):
            orig(self, name, create, size)
            if create:
                log(self._name)
            return
        while True:
            n = name if name is not None else make_name().lstrip("/")
            log(n)
            try:
                return orig(self, n, create, size)
            except FileExistsError:
                if name is not None:
                    raise

    shared_memory.SharedMemory.__init__ = init


class _Reaper:
    """Cleans up this worker's process group, shared memory and temporary folder when the parent is gone or a
    SIGTERM / SIGHUP arrives (see the module docstring)."""

    def __init__(self, spec_path: str):
        self.pid = os.getpid()
        self.shm_log = spec_path + ".shm"
        folder = os.path.dirname(os.path.abspath(spec_path))
        # only the parent's own temporary folder is removed (never, say, the cwd of a hand-started worker)
        self.folder = folder if os.path.basename(folder).startswith(TEMP_PREFIX) else None
        self.leader = os.getpgrp() == self.pid  # started with start_new_session: the group is ours alone

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        os.register_at_fork(after_in_child=_default_signals)  # Lava's children: default actions
        parent = os.environ.get("STATA_LAVA_PARENT")
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                    print(f"lava_worker: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()})", file=sys.stderr)
            except (OSError, AttributeError) as e:
                print(f"lava_worker: no parent-death signal: {e}", file=sys.stderr)
        if parent and os.getppid() != int(parent):  # the parent died before prctl: no signal would come
            self.die(1)

    def _on_signal(self, signum, frame):
        if os.getpid() != self.pid:  # a forked child that kept the handler (forked from a thread): default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.die(128 + signum)

    def die(self, code: int) -> None:
        """Unlink every logged shared-memory segment, remove the temporary folder, then SIGKILL the whole process
        group (this process included). Never returns."""
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})  # no re-entry
            for name in _read_lines(self.shm_log):
                try:
                    os.unlink(f"/dev/shm/{name.lstrip('/')}")
                except OSError:
                    pass
            if self.folder:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            try:
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - dying anyway
                pass
            if self.leader:
                os.killpg(0, signal.SIGKILL)
            os._exit(code)


def _default_signals() -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, signal.SIG_DFL)
        except ValueError:  # forked from a thread other than the main one: _Reaper._on_signal checks the pid
            pass


def _hang(folder: str | None) -> None:
    """Test hook: block until killed (SIGTERM / SIGHUP still clean up). Writes ``hang`` (this pid) first."""
    if folder:
        tmp = os.path.join(folder, "hang.tmp")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(folder, "hang"))
    while True:
        time.sleep(3600)


LAVA_MODULES = {  # spec cls "lava:<Class>" -> the lava.proc module defining it (runtimes.lava_runtime.LAVA_CLASSES)
    "Sparse": "lava.proc.sparse.process",
    "Dense": "lava.proc.dense.process",
    "LIF": "lava.proc.lif.process",
    "LIFReset": "lava.proc.lif.process",
}


def _process_class(name: str, ours):
    """A spec's ``cls``: "lava:<Class>" is Lava's own process (lava.proc), any other name one of ``ours``
    (runtimes.lava_procs)."""
    if name.startswith("lava:"):
        import importlib

        cls = name[5:]
        if cls not in LAVA_MODULES:
            raise ValueError(f"unknown Lava process {name!r} (known: {', '.join(LAVA_MODULES)})")
        return getattr(importlib.import_module(LAVA_MODULES[cls]), cls)
    return getattr(ours, name)


def _connect(out_port, in_port) -> None:
    """Connect, through a virtual ReshapePort when the shapes differ (Lava's processes are 1-D (B * N,), ours
    carry (B, ...)): both flatten in C order, sample-major."""
    if tuple(out_port.shape) != tuple(in_port.shape):
        out_port = out_port.reshape(tuple(in_port.shape))
    out_port.connect(in_port)


class Network:
    def __init__(self, spec: dict):
        from lava.proc.io.extractor import Extractor
        from lava.proc.io.injector import Injector

        from runtimes import lava_procs

        self.spec = spec
        self.T, self.Bc = spec["T"], spec["batch"]
        self.procs = {}
        self.inj = Injector(shape=(self.Bc, *spec["input_shape"]), buffer_size=spec["buffer"])
        self.procs["input"] = self.inj
        for p in spec["procs"]:
            kwargs = p["kwargs"]
            if p.get("block_diag"):  # Lava's Sparse over the flattened batch: kron(I_B, W), sample-major
                import scipy.sparse as sp  # a Lava dependency

                W = sp.kron(sp.identity(p["block_diag"], format="csr"), kwargs["weights"], format="csr")
                W.sort_indices()
                kwargs = {**kwargs, "weights": W}
            proc = _process_class(p["cls"], lava_procs)(**kwargs, name=p["name"])
            self.procs[p["name"]] = proc
            for port, src in zip(p["in_ports"], p["inputs"]):
                _connect(self._out_port(src), getattr(proc, port))
        self.ext = {}
        for key, (src, lag, shape) in spec["records"].items():
            e = Extractor(shape=(self.Bc, *shape), buffer_size=spec["buffer"])
            _connect(self._out_port(src), e.in_port)
            self.ext[key] = (e, lag)
        self.max_lag = max(lag for _, lag in self.ext.values())
        # fixed point: a recorded layer arrives as integers in units of its grid (spikes: 1)
        self.record_grids = dict(spec.get("record_grids") or {})
        self.started = False

    def run_cfg(self):
        """``Loihi2SimCfg`` selecting every process model by the spec's tag: ``floating_pt`` (Lava's float models,
        ours in float64) or ``fixed_pt`` (Lava's bit-accurate ``PySparseModelBitAcc`` / ``PyLifResetModelBitAcc``,
        ours with integer ports). The Injector / Extractor have two untagged models each (Loihi-synchronous and
        asynchronous): named here, since a tag cannot select them."""
        from lava.magma.core.run_configs import Loihi2SimCfg
        from lava.proc.io.extractor import Extractor, PyLoihiExtractorModel
        from lava.proc.io.injector import Injector, PyLoihiInjectorModel

        return Loihi2SimCfg(select_tag=self.spec.get("select_tag", "floating_pt"),
                            exception_proc_model_map={Injector: PyLoihiInjectorModel,
                                                      Extractor: PyLoihiExtractorModel})

    def _out_port(self, name):
        proc = self.procs[name]
        for attr in ("out_port", "a_out", "s_out", "out"):
            if hasattr(proc, attr):
                return getattr(proc, attr)
        raise KeyError(name)

    def run(self, x: np.ndarray, after_start=None) -> dict:
        """after_start: called once Lava runs (processes started, shared memory made) before any step (a test hook)."""
        from lava.magma.core.run_conditions import RunSteps

        K, T = x.shape[0], self.T
        drain = -(-self.max_lag // T)  # whole chunks of zeros so the phase stays aligned across requests
        steps = (K + drain) * T
        zeros = np.zeros((self.Bc, *self.spec["input_shape"]))
        out = {k: np.zeros((K + drain) * T, dtype=object) for k in self.ext}
        t0 = time.perf_counter()
        self.inj.run(condition=RunSteps(num_steps=steps, blocking=False), run_cfg=self.run_cfg())
        t_compiled = time.perf_counter()
        if after_start is not None:
            after_start()
        for s in range(steps):
            k, t = divmod(s, T)
            self.inj.send(x[k, t] if k < K else zeros)
            for key, (e, lag) in self.ext.items():
                out[key][s] = e.receive()
        self.inj.wait()
        t1 = time.perf_counter()
        res = {}
        for key, (e, lag) in self.ext.items():
            seq = np.stack(list(out[key][lag:lag + K * T]))  # (K*T, Bc, ...) in model order
            seq = seq.reshape(K, T, *seq.shape[1:]).swapaxes(0, 1)  # (T, K, Bc, ...)
            res[key] = seq.reshape(T, K * self.Bc, *seq.shape[3:]) * self.record_grids.get(key, 1.0)
        stats = {"steps": steps, "seconds": t1 - t0, "first_run_seconds": (t_compiled - t0) if not self.started else 0.0}
        self.started = True
        return res, stats

    def stop(self):
        if self.started:
            self.inj.stop()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = os.path.abspath(argv[0])
    reaper = _Reaper(spec_path)
    reaper.install()  # before anything slow: from here on the parent's death is never missed
    _log_shared_memory(reaper.shm_log)
    out = sys.stdout
    sys.stdout = sys.stderr  # Lava may print; keep the protocol channel clean

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    hang = (lambda: _hang(reaper.folder)) if os.environ.get("STATA_LAVA_TEST_HANG") == "1" else None
    net = None
    stopped = False
    try:
        spec = decode_spec(spec_path)
        t0 = time.perf_counter()
        net = Network(spec)
        reply({"ok": True, "ready": True, "build_seconds": time.perf_counter() - t0})
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("cmd") == "stop":
                stopped = True
                break
            if req.get("cmd") == "crash":  # used by tests: an exception inside the serving loop
                raise RuntimeError("crash requested")
            if req.get("cmd") == "hang":  # used by tests: a simulation that never answers
                _hang(reaper.folder)
            if req.get("cmd") == "run":
                x = np.load(req["x"], allow_pickle=False)
                res, stats = net.run(x, after_start=hang)
                np.savez(req["out"], **res)
                reply({"ok": True, **stats})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which then kills the whole process group
        try:
            traceback.print_exc(file=sys.stderr)
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
            sys.stderr.flush()
        finally:  # even if the reply fails (BrokenPipeError: the parent is gone)
            os._exit(1)  # never call Lava's stop() after a failure: it can hang; the parent cleans up
    if not stopped:  # end of input: the parent is gone (or killed us); Lava's stop() could hang
        reaper.die(0)
    if net is not None:
        net.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
