"""The Lava simulation child process (numpy + lava only: never imports torch or stata_deploy).

``python -m runtimes.lava_worker SPEC.pkl`` builds the network described by SPEC (written by
``runtimes.lava_runtime``) once, then serves requests on stdin, one JSON line each::

    {"cmd": "run", "x": "in.npy", "out": "out.npz"}   ->  {"ok": true, "steps": n, "seconds": s, ...}
    {"cmd": "stop"} or end of input                    ->  stops Lava and exits

``x`` is (K, T, Bc, *input_shape): K chunks of Bc samples, streamed back to back with period T (pipelined), plus
enough zero steps to drain the deepest lag. ``out`` holds, per recorded layer, (T, K * Bc, ...) aligned to model
timesteps (the lag of each layer removed). Errors are reported as {"ok": false, "error": "..."} on stdout.

Every shared-memory segment this process tree creates is logged to ``SPEC.shm`` (one name a line) before it is
used, so the parent can unlink them if it has to kill the process group.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
import traceback

import numpy as np


def _log_shared_memory(log_path: str) -> None:
    """Append the name of every SharedMemory segment created in this process tree (fork inherits the patch)."""
    from multiprocessing import shared_memory

    orig = shared_memory.SharedMemory.__init__

    def init(self, name=None, create=False, size=0):
        orig(self, name, create, size)
        if create:
            with open(log_path, "a") as f:
                f.write(self._name + "\n")

    shared_memory.SharedMemory.__init__ = init


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
            cls = getattr(lava_procs, p["cls"])
            proc = cls(**p["kwargs"], name=p["name"])
            self.procs[p["name"]] = proc
            for port, src in zip(p["in_ports"], p["inputs"]):
                self._out_port(src).connect(getattr(proc, port))
        self.ext = {}
        for key, (src, lag, shape) in spec["records"].items():
            e = Extractor(shape=(self.Bc, *shape), buffer_size=spec["buffer"])
            self._out_port(src).connect(e.in_port)
            self.ext[key] = (e, lag)
        self.max_lag = max(lag for _, lag in self.ext.values())
        self.started = False

    def _out_port(self, name):
        proc = self.procs[name]
        for attr in ("out_port", "a_out", "s_out", "out"):
            if hasattr(proc, attr):
                return getattr(proc, attr)
        raise KeyError(name)

    def run(self, x: np.ndarray) -> dict:
        from lava.magma.core.run_conditions import RunSteps
        from lava.magma.core.run_configs import Loihi2SimCfg

        K, T = x.shape[0], self.T
        drain = -(-self.max_lag // T)  # whole chunks of zeros so the phase stays aligned across requests
        steps = (K + drain) * T
        zeros = np.zeros((self.Bc, *self.spec["input_shape"]))
        out = {k: np.zeros((K + drain) * T, dtype=object) for k in self.ext}
        t0 = time.perf_counter()
        self.inj.run(condition=RunSteps(num_steps=steps, blocking=False), run_cfg=Loihi2SimCfg())
        t_compiled = time.perf_counter()
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
            res[key] = seq.reshape(T, K * self.Bc, *seq.shape[3:])
        stats = {"steps": steps, "seconds": t1 - t0, "first_run_seconds": (t_compiled - t0) if not self.started else 0.0}
        self.started = True
        return res, stats

    def stop(self):
        if self.started:
            self.inj.stop()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = argv[0]
    _log_shared_memory(spec_path + ".shm")
    out = sys.stdout
    sys.stdout = sys.stderr  # Lava may print; keep the protocol channel clean

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    net = None
    try:
        with open(spec_path, "rb") as f:
            spec = pickle.load(f)
        t0 = time.perf_counter()
        net = Network(spec)
        reply({"ok": True, "ready": True, "build_seconds": time.perf_counter() - t0})
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("cmd") == "stop":
                break
            if req.get("cmd") == "crash":  # used by tests: an exception inside the serving loop
                raise RuntimeError("crash requested")
            if req.get("cmd") == "run":
                x = np.load(req["x"])
                res, stats = net.run(x)
                np.savez(req["out"], **res)
                reply({"ok": True, **stats})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which then kills the whole process group
        traceback.print_exc(file=sys.stderr)
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        sys.stderr.flush()
        os._exit(1)  # never call Lava's stop() after a failure: it can hang; the parent cleans up
    if net is not None:
        net.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
