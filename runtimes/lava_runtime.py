"""The Lava runtime: runs an exported model on Lava's CPU simulator (``Loihi2SimCfg``) with the torch spikes.

    rt = LavaRuntime("runs/a/model.nir", precision="float", timeout=600, batch=32)
    result = rt.run(x)          # RunResult: logits per timestep, every neuron layer's spikes (torch names/layout)
    rt.close()                  # stops Lava; always called (also on failure / Ctrl-C / garbage collection)

How the network is built
    ``runtimes.nir_graph.read_graph`` reads the .nir file (our exporter's, with its description in metadata) into the
    lowered IR (``stata_deploy.ir.lowered``: one typed node per NIR node; host operations are core IR Product /
    Neuron nodes); ``lower_graph`` maps each node through the table ``LOWER`` (by node type; host operations through
    ``LOWER_HOST`` by IR node kind) onto processes of ``runtimes.lava_procs``
    (numpy-only process models): Affine / Conv2d / SumPool2d -> ``Synapse`` (BatchNorm is already folded; a 3x3 conv
    or a pool is an unrolled sparse matrix, a 1x1 conv a per-token matmul, because Lava's ``Conv`` runs ~1 s/step in
    Python), LIF -> ``Neuron`` (fires at H >= the next float64 above NIR's v_threshold, i.e. NIR's v > v_threshold;
    in float precision the spec moves the standard parts onto Lava's own processes, below), Flatten / summed edges /
    port masks -> ``Op1`` / ``Op2``, and the host operations NIR cannot express (SSA's (Q K^T) V, A2OS2A's ReLU K,
    ternary V and Q (K^T V)) -> ``Op2`` matmuls and ``Neuron`` s. A Synapse whose only consumer is one Neuron is fused
    with it (``SynapseNeuron``: same timing, fewer processes). An ``Injector`` streams the input and one
    ``Extractor`` per neuron layer streams its spikes out (no ``Var.get``). Every port carries a batch of ``batch``
    samples (parallel copies): one build serves every sample.

Lava's own processes (issue 14)
    In float precision, each fused Synapse -> LIF pair that Lava expresses exactly runs on Lava's own
    ``lava.proc.sparse.Sparse`` -> ``lava.proc.lif.LIFReset`` (``_lava_pair``): du = 1, dv = 1/tau, weights and bias
    scaled by r/tau, vth = the file's v_threshold (Lava's strict ``>`` is NIR's rule), reset every T steps at the
    layer's model timestep 0; the batch is flattened sample-major into a block-diagonal kron(I_B, W) on (B * N,)
    (the worker connects (B, ...) ports of ours through Lava ReshapePorts). A pair of a token segment whose schedule
    drops tokens at some timesteps (no input, no bias then) is Lava's too, with its bias on a second Sparse from our
    0/1 gate per token (``_lava_masked_pair``). Ours stay for what lava.proc lacks: products of two spike trains
    (Op2 matmul), ReLU / ternary neurons, the schedule's gates (Op1 ``mask`` / ``ones``), biased synapses without a
    LIF (the head: Lava's Sparse has no bias), reshapes and the sums not split as below.
    ``LavaRuntime.process_kinds`` counts both; ``lava_procs=False`` builds everything from ours (for comparison).
    Also: a bias-free synapse on its own (token selection / placement) is Lava's Sparse; a LIF fed by one product
    or sum (SSA / A2OS2A attn_lif, SDSA's spike ANDs) is Lava's LIFReset with that Op2's output scaled by r/tau;
    a two-edge sum feeding only a Sparse -> LIF pair becomes two Sparse into the LIF's a_in (Lava sums an InPort's
    connections). Fixed precision uses the same processes with Lava's bit-accurate models (below).
    Delays: a Delay of n steps is n identity Lava Sparse (Lava's DelaySparse rebuilds its delay-split matrix every
    step: 2.8 ms for 33k identity synapses, 60x a Sparse's matvec).
    Cost [measured 2026-12-01, 2 cores otherwise idle, the tests' lively spikformer-tiny models, batch 16, 32
    samples, best of 4 steady-state runs (runs vary by up to 30%); all ours -> Lava's own]: ssa 48.2 -> 46.1
    ms/step (75 -> 92 processes), sdsa 44.2 -> 69.9 (80 -> 107), a2os2a (unpruned) 50.8 -> 70.4 (83 -> 110); worker
    build 0.2-0.35 -> 1.5-2.5 s (the kron and Lava's Sparse construction); compile unchanged (2.5-3.2 s). The
    block-diagonal Sparse holds B copies of each weight matrix and multiplies one long vector, where ours multiplies
    one matrix by B columns; each delay step is one more process.

Timing (explicit)
    Like Lava's Dense, every Synapse delays by one step; all other processes are combinational. Each tensor has a
    lag (synapses on its longest path); inputs of an op with different lags are delay-matched with ``Delay``
    processes (e.g. residual branches: 2 steps for x + SSA(x), 2 for x + MLP(x)). Chunks of ``batch`` samples stream back
    to back with period T (pipelined); a run of K chunks lasts (K + ceil(depth / T)) * T steps; each neuron resets at
    its own model timestep 0; outputs are re-aligned by removing each layer's lag before comparing with torch.

Token pruning
    Tokens never kept are structurally absent from the graph; the per-timestep schedule (T, n) of each token segment
    multiplies the outputs of that segment's ops and gates each neuron's input (a dropped token gets no input, so its
    membrane decays and it stays silent: the documented semantics of ``stata_deploy.nn.neurons``). Results are
    converted to the torch slot layout (pruned tokens absent) before they are returned. Note: in a static-topology
    simulation a token dropped at some timesteps is still computed (masked) at those timesteps.

Precision
    ``float``: float64 (as the reader's executor), neuron updates in the reader's / torch's operation order
    (``dtype='float32'`` is available). Measured: zero spike mismatches against torch. ``fixed``: the worker runs
    ``Loihi2SimCfg(select_tag="fixed_pt")``: the standard layers on Lava's bit-accurate models
    ``PySparseModelBitAcc`` (``lava.proc.sparse.models``) and ``PyLifResetModelBitAcc`` (``lava.proc.lif.models``),
    with each layer's integers derived once by ``loihi_layer`` / ``loihi_lif_for_grid`` (the rules in
    ``stata_deploy.loihi_fixed``: 8-bit weight mantissas filled by the largest |weight|, weight exponent <= 0,
    24-bit state, du 4095, dv round(4096 / tau), threshold floor(v_threshold / q), bias on the input quantum q; the
    image as 8-bit pixels). Ours run their ``fixed_pt`` models: integers at every port, scaled as documented in
    ``_Builder._fixed_point`` (our synapses: power-of-two weight grids, ``_quantise``). ``quantisation`` lists every
    layer's numbers. The accuracy cost is measured against torch (benchmarks/lava_speed.py --parity; README).

Process safety
    The simulation runs in a child process (``runtimes.lava_worker``, numpy + lava only) in its own process group,
    with a hard timeout; its network spec is JSON + one npz (no pickle). ``close`` asks it to stop Lava (3 s grace);
    on failure, timeout, Ctrl-C, SIGTERM/SIGHUP of the CLI (``stata_deploy.cli.main.Terminated``), garbage collection or
    interpreter exit, and after every close, the whole group is killed, every shared-memory segment it logged is
    unlinked and its temp folder removed. If the parent dies without cleaning up (SIGKILL), the worker gets
    SIGTERM (Linux parent-death signal) and does the same itself; on end of input it exits without Lava's stop().
"""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stata_deploy import loihi_fixed
from stata_deploy.errors import DataError, StataError, UnsupportedOpError
from stata_deploy.ir.geometry import conv_len
from stata_deploy.nn.neurons import TAU, V_RESET, V_TH
from stata_deploy.results import RunResult
from stata_deploy.runtime_api import Runtime

from runtimes.lava_worker import LAVA_MODULES, SPEC_FORMAT, SPEC_TAGS, TAG_ARRAY, TAG_CSR, TAG_TUPLE, TEMP_PREFIX
from runtimes.nir_graph import NirFormatError
from stata_deploy.ir.lowered import LIF, Affine, Conv1d, Conv2d, Flatten, InputPort, OutputPort, SumPool2d

PRECISIONS = ("float", "fixed")


class LavaTimeout(StataError):
    """The Lava simulation did not finish in time (its processes were killed)."""

# ---------------------------------------------------------------------------------------- child process
class _Worker:
    """The Lava simulation in a child process (its own session/process group) with a hard timeout.

    Any failure, timeout, Ctrl-C / SIGTERM / SIGHUP (``stata_deploy.cli.main.Terminated``) or close() that is not a clean
    stop kills the whole process group (Lava forks a process per Lava process plus a shared-memory manager),
    unlinks every shared-memory segment the group logged (runtimes.lava_worker logs them before it creates them)
    and removes the temporary folder. If this process dies without cleaning up (SIGKILL), the worker does it: it
    gets SIGTERM from the kernel when its parent dies, or end of input on stdin (see runtimes.lava_worker).
    """

    def __init__(self, spec: dict, timeout: float):
        self.timeout = float(timeout)
        self.dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        self.stderr = None
        try:
            self.spec_path = self.dir / "spec.json"
            _write_spec(spec, self.spec_path)
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       PYTHONWARNINGS="ignore", STATA_LAVA_PARENT=str(os.getpid()))
            if len(str(self.dir)) <= 64:  # room for multiprocessing's pymp-*/listener-* socket path (108 bytes)
                env["TMPDIR"] = str(self.dir)  # Lava's (multiprocessing's) temporary files go with our folder
            self.stderr = open(self.dir / "stderr.txt", "w+b")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtimes.lava_worker", str(self.spec_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
                start_new_session=True,  # own process group: killpg reaches every Lava child, Ctrl-C does not
            )
        except BaseException:  # nothing started (or only the worker, which then sees its stdin close): no folder
            if self.stderr is not None:
                self.stderr.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.pgid = self.proc.pid
        self.n = 0
        self.shm_names: list[str] = []
        self.ready: dict = {}

    def start(self) -> None:
        """Wait until the worker has built the Lava processes."""
        try:
            self.ready = self._read_reply()
        except BaseException:
            self.kill()
            raise

    def _read_reply(self) -> dict:
        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise LavaTimeout(f"Lava simulation did not answer within {self.timeout:.0f} s (timeout); "
                                  "its process group was killed")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise StataError(f"Lava simulation exited unexpectedly:\n{self._stderr_tail()}")
                buf += chunk
        msg = json.loads(buf.decode())
        if not msg.get("ok"):
            raise StataError(f"Lava simulation failed: {msg.get('error')}\n{self._stderr_tail()}")
        return msg

    def _stderr_tail(self, n: int = 1500) -> str:
        try:
            self.stderr.flush()
            return (self.dir / "stderr.txt").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request(self, x: np.ndarray) -> tuple[dict, dict]:
        self.n += 1
        xin, out = self.dir / f"x{self.n}.npy", self.dir / f"out{self.n}.npz"
        np.save(xin, x)
        try:
            self.proc.stdin.write((json.dumps({"cmd": "run", "x": str(xin), "out": str(out)}) + "\n").encode())
            self.proc.stdin.flush()
            stats = self._read_reply()
            with np.load(out) as z:
                res = {k: z[k] for k in z.files}
        except BaseException:  # failure, timeout or KeyboardInterrupt: nothing may survive
            self.kill()
            raise
        finally:
            for p in (xin, out):
                p.unlink(missing_ok=True)
        return res, stats

    def send_raw(self, obj: dict) -> None:
        """Test hook: send a raw command (e.g. {"cmd": "crash"})."""
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def stop(self, grace: float = 3.0) -> None:
        """Clean stop: ask the worker to stop Lava; kill the group if it does not exit within ``grace`` s."""
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write(b'{"cmd": "stop"}\n')
                    self.proc.stdin.flush()
                    self.proc.wait(grace)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        finally:  # also when a signal (Terminated / KeyboardInterrupt) arrives during the grace period
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # Lava's children are in the same group; wait until the group is gone before unlinking shared memory.
        deadline = time.monotonic() + 10
        while _group_alive(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.shm_names = sorted(set(self.shm_names) | set(_read_lines(Path(str(self.spec_path) + ".shm"))))
        for name in self.shm_names:
            try:
                os.unlink(f"/dev/shm/{name.lstrip('/')}")
            except OSError:
                pass
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _read_lines(p: Path) -> list[str]:
    try:
        return [s for s in p.read_text().split() if s]
    except OSError:
        return []


def _write_spec(spec: dict, path: Path) -> None:
    """Write the worker's spec (``_Builder.spec``: nested dicts / lists / tuples of str, int, float, bool, None,
    numpy arrays and scipy.sparse matrices) as JSON at ``path`` plus one ``.npz`` beside it holding the arrays
    (no pickle anywhere: object arrays are refused). ``runtimes.lava_worker.decode_spec`` reads it back; tuples stay
    tuples, sparse matrices come back as CSR, and an array referenced twice is stored once."""
    arrays: dict[str, np.ndarray] = {}
    keys: dict[int, str] = {}
    alive = []  # keeps every encoded object alive, so that id() keys stay unique

    def array(a, where):
        k = keys.get(id(a))
        if k is None:
            if a.dtype.hasobject:
                raise TypeError(f"spec{where}: object array (would need pickle)")
            k = keys[id(a)] = f"a{len(arrays)}"
            arrays[k] = a
            alive.append(a)
        return k

    def enc(o, where):
        if o is None or isinstance(o, (str, bool, int, float)):
            return o
        if isinstance(o, np.generic):
            return enc(o.item(), where)
        if isinstance(o, dict):
            for k in o:
                if not isinstance(k, str) or k in SPEC_TAGS:
                    raise TypeError(f"spec{where}: key {k!r} (keys must be str and not one of {SPEC_TAGS})")
            return {k: enc(v, f"{where}.{k}") for k, v in o.items()}
        if isinstance(o, tuple):
            return {TAG_TUPLE: [enc(v, f"{where}[{i}]") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(o)]
        if isinstance(o, np.ndarray):
            return {TAG_ARRAY: array(o, where)}
        if sp.issparse(o):
            m = o.tocsr()
            alive.append(m)
            return {TAG_CSR: {"data": array(m.data, where), "indices": array(m.indices, where),
                              "indptr": array(m.indptr, where), "shape": [int(n) for n in m.shape]}}
        raise TypeError(f"spec{where}: cannot encode {type(o).__name__}")

    doc = {"format": SPEC_FORMAT, "arrays": path.with_suffix(".npz").name, "spec": enc(spec, "")}
    np.savez(path.with_suffix(".npz"), **arrays)
    path.write_text(json.dumps(doc))

# -------------------------------------------------------------------------------------------- the builder
@dataclass
class _Node:
    name: str  # process name in the spec ("input" for the source)
    shape: tuple  # per-sample shape (without the batch)
    lag: int  # steps behind the source
    grid: float = 0.0  # fixed point: the value grid of this tensor (0: real-valued / float mode)


class _Builder:
    """Collects Lava process specs (pure data) for the worker. Tracks each tensor's lag and delay-matches inputs
    of different lag with ``Delay`` processes (Lava semantics: a Synapse adds one step, everything else none)."""

    def __init__(self, T: int, batch: int, precision: str, dtype: str = "float64"):
        self.T, self.B, self.precision = T, batch, precision
        self.dtype = dtype
        self.procs: list[dict] = []
        self.records: dict[str, tuple] = {}
        self.layouts: dict[str, tuple] = {}  # record key -> (layout, token segment) for the torch slot layout
        self.quant: list[dict] = []  # fixed point: what was quantised, per layer
        self._n = 0
        self._delays: dict[tuple, _Node] = {}
        # with Lava's own processes: a Delay of n steps as n identity Lava Sparse (Lava's DelaySparse rebuilds its
        # delay-split matrix every step: 2.8 ms per step for 33k identity synapses, 60x a Sparse's matvec)
        self.lava_delays = True
        self.netx_input = False  # fixed point: quantise the image layer as the netx exporter does (no exponent)

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{self._n:03d}_{base}"[:60]

    def _add(self, cls, base, inputs, in_ports, node_shape, node_lag, node_grid=0.0, **kwargs) -> _Node:
        name = self._name(base)
        self.procs.append(dict(cls=cls, name=name, inputs=[i.name for i in inputs], in_ports=in_ports,
                               kwargs=kwargs))
        return _Node(name, tuple(node_shape), node_lag, node_grid)

    def input(self, shape) -> _Node:
        self.input_shape = tuple(shape)
        return _Node("input", tuple(shape), 0, 2.0 ** -loihi_fixed.INPUT_BITS if self.precision == "fixed" else 0.0)

    def delay(self, x: _Node, lag: int) -> _Node:
        """x delayed to ``lag`` (>= x.lag)."""
        if lag == x.lag:
            return x
        if lag < x.lag:
            raise AssertionError("cannot advance a signal")
        key = (x.name, lag)
        if key not in self._delays:
            self._delays[key] = self._add("Delay", "delay", [x], ["in0"], x.shape, lag, x.grid,
                                          shape=(self.B, *x.shape), steps=lag - x.lag)
        return self._delays[key]

    def synapse(self, x: _Node, weight, bias, out_shape, label: str, mode: str, mask=None) -> _Node:
        weight = weight.astype(np.float64).tocsr() if sp.issparse(weight) else np.asarray(weight, dtype=np.float64)
        bias = None if bias is None else np.asarray(bias, dtype=np.float64)
        if bias is not None and not bias.any():
            bias = None
        grid, extra = 0.0, {}
        if self.precision == "fixed":  # weights stay real here: the spec quantises them (Lava's layers or ours)
            extra["wgrid"] = _pow2_grid(weight)
            grid = extra["wgrid"] * min(1.0, x.grid or 1.0)  # the output's value grid (input on grid x.grid)
        return self._add("Synapse", label, [x], ["s_in"], out_shape, x.lag + 1, grid,
                         in_shape=(self.B, *x.shape), out_shape=(self.B, *out_shape), weight=weight, bias=bias,
                         mode=mode, mask=mask, T=self.T, lag=x.lag + 1, **extra)

    def _quantise(self, w, b, label):
        """Our Synapse in fixed point (Loihi-like): 8-bit signed weight mantissas with one power-of-two exponent
        per layer (``_pow2_grid``, rounded to nearest); the bias as a 13-bit mantissa on that grid shifted by the
        smallest exponent in [0, 7] that holds it (clipped beyond)."""
        grid = _pow2_grid(w)
        if grid == 1.0 and not (w.nnz if sp.issparse(w) else np.asarray(w).any()):
            return w, b, 1.0
        if sp.issparse(w):
            wq = w.copy()
            wq.data = np.clip(np.round(w.data / grid), -127, 127) * grid
            err = float(abs(wq.data - w.data).max())
        else:
            wq = np.clip(np.round(w / grid), -127, 127) * grid
            err = float(abs(wq - w).max())
        bexp = 0  # as Loihi's bias: a 13-bit mantissa << the smallest exponent in [0, 7] that holds it
        while b is not None and bexp < 7 and np.abs(np.round(b / (grid * 2 ** bexp))).max(initial=0) > 4095:
            bexp += 1
        bg = grid * 2 ** bexp
        bq = None if b is None else np.clip(np.round(b / bg), -4096, 4095) * bg
        self.quant.append({"layer": label, "process": "ours", "weight_bits": 8, "exponent": int(math.log2(grid)),
                           "bias_exp": bexp, "max_weight_error": err,
                           "max_bias_error": 0.0 if b is None else float(abs(bq - b).max())})
        return wq, bq, grid

    def neuron(self, x: _Node, label: str, kind="lif", mask=None, **params) -> _Node:
        """params: tau_steps, r, v_leak, v_th, v_reset (scalars or arrays)."""
        fixed = self.precision == "fixed"
        out_grid = (1.0 if kind != "relu" else x.grid) if fixed else 0.0
        for k, v in list(params.items()):
            a = np.asarray(v, dtype=np.float64)
            params[k] = float(a.flat[0]) if a.size and (a == a.flat[0]).all() else a
        return self._add("Neuron", label, [x], ["a_in"], x.shape, x.lag, out_grid, shape=(self.B, *x.shape),
                         kind=kind, T=self.T, lag=x.lag, mask=mask, token_axis=-1,
                         grid=x.grid if fixed else 0.0, dtype=self.dtype, **params)

    def op1(self, kind, x: _Node, out_shape, label, grid=None, mask=None, **params) -> _Node:
        return self._add("Op1", label, [x], ["in0"], out_shape, x.lag, x.grid if grid is None else grid,
                         kind=kind, in_shape=(self.B, *x.shape), out_shape=(self.B, *out_shape), params=params,
                         T=self.T, lag=x.lag, mask=mask)

    def op2(self, kind, a: _Node, b: _Node, out_shape, label, grid=0.0, mask=None, **params) -> _Node:
        lag = max(a.lag, b.lag)
        a, b = self.delay(a, lag), self.delay(b, lag)
        return self._add("Op2", label, [a, b], ["in0", "in1"], out_shape, lag, grid, kind=kind,
                         a_shape=(self.B, *a.shape), b_shape=(self.B, *b.shape), out_shape=(self.B, *out_shape),
                         params=params, T=self.T, lag=lag, mask=mask)

    def add(self, a: _Node, b: _Node, label="add") -> _Node:
        return self.op2("add", a, b, a.shape, label, grid=min(a.grid, b.grid) if a.grid and b.grid else 0.0)

    def record(self, key: str, x: _Node, layout=None) -> None:
        if key in self.records:
            raise NirFormatError(f"layer {key!r} is recorded twice in this graph")
        self.records[key] = (x.name, x.lag, x.shape)
        self.layouts[key] = layout

    def spec(self, buffer: int, fuse: bool = True, lava_procs: bool = True) -> dict:
        """The worker's spec. fuse: Synapse -> Neuron pairs become one process; lava_procs: standard pairs (see
        ``_lava_pair``) become Lava's own ``Sparse`` + ``LIFReset``. Fixed precision: then ``_fixed_point``
        (Lava's bit-accurate models, integer ports, ``self.quant``)."""
        procs = self._fused(lava_procs) if fuse else self.procs
        fixed = self.precision == "fixed"
        grids = {}
        if fixed:
            procs, grids = self._fixed_point(procs)
        return dict(T=self.T, batch=self.B, input_shape=self.input_shape, procs=procs, records=self.records,
                    buffer=buffer, select_tag="fixed_pt" if fixed else "floating_pt",
                    record_grids={k: grids[src] for k, (src, _, _) in self.records.items()} if fixed else {})

    def _fixed_point(self, procs: list[dict]) -> tuple[list[dict], dict]:
        """Fixed point (``Loihi2SimCfg(select_tag="fixed_pt")``): every tensor between processes is an integer
        array in units of its grid (``grids``: proc name -> the value of one unit; spikes 1). Returns new procs
        and the grids; fills ``self.quant`` (one entry per quantised layer).

        Boundaries (the scaling at each):
        - image -> network: our ``Op1`` ``quantise`` sends round(x * 2^k), the pixel grid 2^-k (k <= 8) chosen by
          the first layer (``loihi_fixed.layer_scale``: the finest that needs no weight exponent);
        - Lava ``Sparse`` -> ``LIFReset`` (a standard layer, one or two Sparse into one LIF): ``loihi_layer``
          quantises weights, bias, threshold and decays once for the layer; the Sparse take the integers of their
          inputs' grids as graded spikes (24-bit messages);
        - a lone Lava ``Sparse`` (token selection / placement, delay chains): integral weights, passed as they are
          (mixed-sign ones doubled with weight_exp -1, since Loihi drops their LSB): output grid = input grid;
        - our ``Op2`` -> Lava ``LIFReset`` (a product or a sum into a LIF): ``loihi_lif_for_grid`` picks the LIF's
          input quantum q; the Op2 sends round(y * r / (tau q)) (exact when y lies on its grid);
        - Lava ``LIFReset`` -> anything: spikes 0 / 1 (grid 1);
        - ours -> ours: integers in units of the producer's grid; ours compute on ``int * grid`` (our Synapse's
          weights on a power-of-two grid, ``_quantise``) and send ``rint(y / out_grid)``;
        - recorded layers: the worker multiplies the integers by their grid (``record_grids``).
        """
        self.quant = []
        consumers: dict[str, list] = {}
        for p in procs:
            for i in p["inputs"]:
                consumers.setdefault(i, []).append(p)
        recorded = {src for src, _, _ in self.records.values()}
        shape = (self.B, *self.input_shape)
        qin = dict(cls="Op1", name="000_input_quantise", inputs=["input"], in_ports=["in0"],
                   kwargs=dict(kind="quantise", in_shape=shape, out_shape=shape, params={}, T=self.T, lag=0,
                               mask=None, in_grids=[1.0], out_grid=None))
        grids = {qin["name"]: None}  # the pixel grid: chosen by the first layer that reads the image

        def pixel_grid(g):
            if grids[qin["name"]] is None:
                grids[qin["name"]] = qin["kwargs"]["out_grid"] = g
            return grids[qin["name"]]

        out, pending, planned = [qin], {}, {}
        for p in procs:
            p = {**p, "inputs": [qin["name"] if i == "input" else i for i in p["inputs"]], "kwargs": dict(p["kwargs"])}
            gin = [grids.get(i) for i in p["inputs"]]  # (a LIF's Sparse inputs are pending: no grid)
            if not p["cls"].startswith("lava:") and None in gin:  # ours read the image first: 8-bit pixels
                gin = [pixel_grid(2.0 ** -loihi_fixed.INPUT_BITS) if g is None else g for g in gin]
            cls, k, name = p["cls"], p["kwargs"], p["name"]
            users = consumers.get(name, [])
            if cls == "lava:Sparse":
                if len(users) == 1 and users[0]["cls"] == "lava:LIFReset" and name not in recorded:
                    pending[name] = (p, gin[0])  # quantised with its LIF (below)
                    continue
                g0 = pixel_grid(2.0 ** -loihi_fixed.INPUT_BITS) if gin[0] is None else gin[0]
                p, grids[name] = _fixed_lone_sparse(p, g0), g0
            elif cls == "lava:LIFReset":
                syns = [pending.pop(i) for i in p["inputs"] if i in pending]
                if syns:
                    if len(syns) != len(p["inputs"]):
                        raise AssertionError(f"{name}: a LIF fed by a Lava Sparse and something else")
                    gated = [s for s, _ in syns if s.get("gated_bias")]  # _lava_masked_pair's bias (at most one)
                    syns = [sg for sg in syns if not sg[0].get("gated_bias")]
                    ks, entry = loihi_layer([s["kwargs"]["weights"] for s, _ in syns], [g for _, g in syns],
                                            k["bias_mant"], k["vth"], 1.0 / k["dv"], netx=self.netx_input,
                                            gated_bias=gated[0]["kwargs"]["weights"] if gated else None)
                    if syns[0][1] is None:
                        pixel_grid(ks["in_grid"])
                    for s, sk in zip([s for s, _ in syns] + gated, ks["sparse"]):  # the gated bias's last
                        out.append({**s, "kwargs": {**s["kwargs"], **sk}})
                    k.update(ks["lif"])
                else:
                    k.update(planned.pop(name))  # from the Op2 that feeds it
                    entry = None
                if entry is not None:
                    self.quant.append({"layer": name.split("_", 1)[1], **entry})
                grids[name] = 1.0
            else:
                k["in_grids"] = gin
                k["out_grid"] = grids[name] = self._our_fixed(p, gin, users, planned)
            out.append(p)
        if pending:
            raise AssertionError(f"Lava Sparse without its LIF: {sorted(pending)}")
        return out, grids

    def _our_fixed(self, p: dict, gin: list[float], users: list[dict], planned: dict) -> float:
        """One of our processes in fixed point: quantise its weights (``_quantise``) and return its output grid;
        an Op2 feeding one Lava LIF gets the LIF's input quantum (``loihi_lif_for_grid``; ``planned`` receives the
        LIF's integer parameters)."""
        cls, k = p["cls"], p["kwargs"]
        if cls in ("Synapse", "SynapseNeuron"):
            syn = dict(k["syn"]) if cls == "SynapseNeuron" else k
            syn["weight"], syn["bias"], wgrid = self._quantise(syn["weight"], syn["bias"], p["name"].split("_", 1)[1])
            g = wgrid * min(1.0, gin[0])
            if cls == "Synapse":
                return g
            k["syn"] = syn
            return g if k["neu"].get("kind", "lif") == "relu" else 1.0
        if cls == "Neuron":
            return gin[0] if k.get("kind", "lif") == "relu" else 1.0
        if cls == "Op1" and k["kind"] == "ones":
            return 1.0  # ones and zeros, integers as they are
        if cls == "Op2":
            if k["kind"] == "matmul":
                g = gin[0] * gin[1] * abs(float(k["params"].get("scale", 1.0)))
            else:
                g = min(gin)
            if len(users) == 1 and users[0]["cls"] == "lava:LIFReset":
                lif = users[0]["kwargs"]
                c = float(k.get("out_scale", 1.0))
                planned[users[0]["name"]], entry = loihi_lif_for_grid(g, c, lif["vth"], 1.0 / lif["dv"])
                self.quant.append({"layer": users[0]["name"].split("_", 1)[1], **entry})
                k["out_scale"] = 1.0
                return entry["q"] / c  # the LIF's a_in in units of y
            return g
        return gin[0]  # Op1 (reshape / mask), Delay

    def process_kinds(self, **spec_kw) -> dict[str, int]:
        """Counts of the built network's processes by kind: ``lava.proc.<module>.<Class>`` for Lava's own
        processes (the Injector and the Extractors included), ``ours:<Class>`` for runtimes.lava_procs."""
        kinds: dict[str, int] = {"lava.proc.io.Injector": 1, "lava.proc.io.Extractor": len(self.records)}
        for p in self.spec(buffer=1, **spec_kw)["procs"]:
            c = p["cls"]
            k = f"lava.proc.{LAVA_MODULES[c[5:]].split('.')[2]}.{c[5:]}" if c.startswith("lava:") else f"ours:{c}"
            kinds[k] = kinds.get(k, 0) + 1
        return kinds

    def _fused(self, lava: bool = False) -> list[dict]:
        """Fuse each Synapse whose only consumer is one Neuron into a SynapseNeuron process (same timing), or, with
        ``lava`` and when ``_lava_pair`` accepts it, into Lava's own Sparse + LIFReset (same timing)."""
        consumers: dict[str, int] = {}
        for p in self.procs:
            for i in p["inputs"]:
                consumers[i] = consumers.get(i, 0) + 1
        for src, _, _ in self.records.values():
            consumers[src] = consumers.get(src, 0) + 1
        by_name = {p["name"]: p for p in self.procs}
        gone, out, gates = set(), [], {}
        for p in self.procs:
            s = by_name.get(p["inputs"][0]) if p["cls"] == "Neuron" else None
            if s is not None and s["cls"] == "Synapse" and consumers.get(s["name"]) == 1:
                gone.add(s["name"])
                neu = {**dict(tau_steps=TAU, r=1.0, v_leak=V_RESET, v_th=V_TH, v_reset=V_RESET), **p["kwargs"]}
                pair = None
                if lava:
                    pair = _lava_pair(s, p["name"], neu)
                    if pair is None:
                        pair = _lava_masked_pair(s, p["name"], neu, _masked_by(s["inputs"][0], s["kwargs"].get("mask"),
                                                                              by_name), gates)
                if pair is not None:
                    out.extend(pair)
                    continue
                p = dict(cls="SynapseNeuron", name=p["name"], inputs=s["inputs"], in_ports=["s_in"],
                         kwargs=dict(syn=s["kwargs"], neu=neu))
            out.append(p)
        out = [p for p in out if not (p["cls"] == "Synapse" and p["name"] in gone)]
        return self._to_lava(out) if lava else out

    def _to_lava(self, procs: list[dict]) -> list[dict]:
        """After fusing: a bias-free Synapse on its own (token selections, placements) -> Lava's ``Sparse``; a LIF
        Neuron fed only by one Op2 (an attention product, a sum) -> Lava's ``LIFReset`` with the Op2's output
        scaled by r/tau (``_lava_lif``; exact for tau = 2 and the dyadic values SSA's ties need)."""
        consumers: dict[str, int] = {}
        for p in procs:
            for i in p["inputs"]:
                consumers[i] = consumers.get(i, 0) + 1
        for src, _, _ in self.records.values():
            consumers[src] = consumers.get(src, 0) + 1
        by_name = {p["name"]: p for p in procs}
        built = {p["name"]: p for p in self.procs}  # before fusing: every process with its token mask
        out = []
        for p in procs:
            k = p["kwargs"]
            if p["cls"] == "Delay" and self.lava_delays:  # a chain of identity Sparse (one step each)
                eye = sp.identity(int(np.prod(k["shape"][1:])), format="csr")
                src = p["inputs"][0]
                for i in range(int(k["steps"])):
                    name = p["name"] if i == k["steps"] - 1 else f"{p['name'][:54]}.d{i}"
                    out.append(dict(cls="lava:Sparse", name=name, inputs=[src], in_ports=["s_in"],
                                    block_diag=int(k["shape"][0]), kwargs=dict(weights=eye, num_message_bits=24)))
                    src = name
                continue
            if p["cls"] == "Synapse" and k.get("bias") is None and _unmasked(k.get("mask")) \
                    and (self.precision == "float" or _integral(k["weight"])):  # fixed: see _fixed_lone_sparse
                p = _lava_sparse(p["name"], p["inputs"], k)
            elif p["cls"] == "Neuron":
                src = by_name.get(p["inputs"][0])
                neu = {**dict(tau_steps=TAU, r=1.0, v_leak=V_RESET, v_th=V_TH, v_reset=V_RESET), **k}
                if _masked_by(p["inputs"][0], neu.get("mask"), built):  # no input at a dropped token already
                    neu = {**neu, "mask": None}
                lif = _lava_lif(p["name"], p["inputs"], neu, None, int(k["T"]), int(k["lag"])) \
                    if src is not None and src["cls"] == "Op2" and consumers.get(src["name"]) == 1 else None
                if lif is not None:
                    src["kwargs"] = {**src["kwargs"], "out_scale": lif.pop("scale")}
                    p = lif
            out.append(p)
        return self._split_sums(out)

    def _split_sums(self, procs: list[dict]) -> list[dict]:
        """A sum of two edges (Op2 add) feeding only a Lava Sparse -> LIFReset pair: W (a + b) = W a + W b, two
        Sparse (one per edge, both already delay-matched) into the LIF's one ``a_in`` (Lava sums the connections
        of an InPort). Removes our add; equal up to float rounding of the sum order (no ties there: real weights)."""
        consumers: dict[str, list] = {}
        for p in procs:
            for i in p["inputs"]:
                consumers.setdefault(i, []).append(p)
        recorded = {src for src, _, _ in self.records.values()}
        by_name = {p["name"]: p for p in procs}
        drop, out = set(), []
        for p in procs:
            if p["cls"] == "lava:Sparse" and p["name"] not in recorded:
                add = by_name.get(p["inputs"][0])
                users = consumers.get(p["name"], [])
                if add is not None and add["cls"] == "Op2" and add["kwargs"]["kind"] == "add" \
                        and add["kwargs"].get("mask") is None and add["kwargs"].get("out_scale", 1.0) == 1.0 \
                        and add["name"] not in recorded and len(consumers.get(add["name"], [])) == 1 \
                        and len(users) == 1 and users[0]["cls"] == "lava:LIFReset" and len(users[0]["inputs"]) == 1:
                    drop.add(add["name"])
                    second = {**p, "name": p["name"][:57] + ".b", "inputs": [add["inputs"][1]]}
                    out += [{**p, "inputs": [add["inputs"][0]]}, second]
                    lif = users[0]
                    lif["inputs"] = [p["name"], second["name"]]
                    lif["in_ports"] = ["a_in", "a_in"]
                    continue
            out.append(p)
        return [p for p in out if p["name"] not in drop]

    @property
    def depth(self) -> int:
        return max(lag for _, lag, _ in self.records.values())

# ------------------------------------------------------------------------- Lava's own processes (lava.proc)


def _synapse_matrix(k: dict) -> sp.csr_matrix:
    """A Synapse's weight as one sparse (Dout, Din) matrix on the flattened sample (C order)."""
    w, mode = k["weight"], k["mode"]
    in_shape = k["in_shape"][1:]
    if mode == "sparse":
        return sp.csr_matrix(w)
    if mode == "cf":  # (Co, Ci) over axis 0 of (Ci, n...): y[co, j] = sum_ci W[co, ci] x[ci, j]
        n = int(np.prod(in_shape[1:]))
        return sp.kron(sp.csr_matrix(w), sp.identity(n, format="csr"), format="csr")
    # affine: (..., out, in) over the last axis, leading axes per position
    P = int(np.prod(in_shape[:-1]))
    wb = np.broadcast_to(w, (*in_shape[:-1], *w.shape[-2:])).reshape(P, *w.shape[-2:])
    if all(np.array_equal(wb[0], wi) for wi in wb[1:]):
        return sp.kron(sp.identity(P, format="csr"), sp.csr_matrix(wb[0]), format="csr")
    return sp.block_diag([sp.csr_matrix(wi) for wi in wb], format="csr")


def _scalar(v):
    a = np.asarray(v, dtype=np.float64)
    return float(a.flat[0]) if a.size and (a == a.flat[0]).all() else None


def _unmasked(m) -> bool:
    return m is None or bool(np.asarray(m).all())


# ------------------------------------------------------------------ fixed point: Loihi's integer parameters
VTH_TARGET = 2 ** 11  # a LIF fed by our Op2: the threshold mantissa its input shift aims at (headroom 64 V_th)


def _pow2_grid(w) -> float:
    """Our Synapse's weight grid: the power of two that puts the largest |weight| in an 8-bit signed mantissa
    (|m| <= 127); 1.0 for an all-zero matrix."""
    wmax = float(abs(w).max()) if (w.nnz if sp.issparse(w) else np.size(w)) else 0.0
    return 2.0 ** math.ceil(math.log2(wmax / 127.0)) if wmax > 0 else 1.0


def _integral(w) -> bool:
    """Integer weights a Lava Sparse holds as they are (token selections / placements, identity delays)."""
    d = w.data if sp.issparse(w) else np.asarray(w)
    return bool(np.all(d == np.rint(d)) and (np.abs(d).max(initial=0) <= 127))


def _fixed_lone_sparse(p: dict, in_grid: float) -> dict:
    """A Lava Sparse that feeds no LIF (token selection / placement, a delay step) in fixed point: its integral
    weights as int32 (mixed-sign ones doubled and weight_exp -1: Loihi stores mixed-sign weights as even
    integers); the output is in its input's units (``in_grid``)."""
    W = p["kwargs"]["weights"].tocsr()
    _, step, _ = loihi_fixed.sign_mode(W.data)
    Wi = W.copy()
    Wi.data = (np.rint(W.data) * step).astype(np.int32)
    return {**p, "kwargs": {**p["kwargs"], "weights": Wi, "weight_exp": -1 if step == 2 else 0,
                            "num_weight_bits": 8}}


def _lif_params(q, bias, v_thr, tau):
    try:
        return loihi_fixed.lif_params(q, bias, v_thr, tau)
    except ValueError as e:
        raise StataError(str(e)) from None


def loihi_layer(weights: list, in_grids: list, bias, v_thr: float, tau: float,
                netx: bool = False, gated_bias=None) -> tuple[dict, dict]:
    """Quantise one standard layer, Lava ``Sparse`` (one, or two carrying the same matrix into one LIF) ->
    ``LIFReset``, ONCE, for Lava's bit-accurate models (``PySparseModelBitAcc``, ``PyLifResetModelBitAcc``), by
    ``stata_deploy.loihi_fixed`` (the rules; the netx exporter uses the same).

    weights: the float csr matrices of the float spec (r / tau folded in); in_grids: the value of one integer unit
    of each Sparse's input (spikes 1; None: the image, whose grid the layer chooses); bias: the LIF's float
    bias_mant (r / tau folded in); v_thr: NIR's v_threshold; tau: 1 / the float dv. Two Sparse of different input
    grids get exponents that give them the same input quantum q. netx: the image layer as the netx exporter
    writes it (no weight exponent; ``loihi_fixed.layer_scale``).
    gated_bias: the float csr matrix of a gated bias Sparse (``_lava_masked_pair``; its input: ones, grid 1),
    quantised after the layer's q is known with an exponent of its own (``loihi_fixed.bias_weights``), last in the
    returned list.
    Returns ({"sparse": [kwargs per Sparse], "lif": LIF kwargs, "in_grid": the first input's grid}, report)."""
    sc = loihi_fixed.layer_scale(np.concatenate([w.data for w in weights]), v_thr, in_grids[0], netx=netx)
    grids = [sc["in_grid"]] + list(in_grids[1:])
    sparse, err = [], 0.0
    for w, gi in zip(weights, grids):
        ei = math.log2(sc["g"] * gi / sc["q"])
        if abs(ei - round(ei)) > 1e-9:
            raise AssertionError(f"fixed point: input grids {in_grids} of one LIF differ by a non-power of two")
        wi = w.tocsr().copy()
        wi.data = loihi_fixed.quantise_weights(w.data, sc)
        err = max(err, float(np.abs(wi.data * sc["g"] - w.data).max(initial=0)))
        sparse.append(dict(weights=wi, weight_exp=int(round(ei)), num_weight_bits=8))
    lif, rep = _lif_params(sc["q"], bias, v_thr, tau)
    if gated_bias is not None:
        wb = gated_bias.tocsr().copy()
        wb.data, bexp = loihi_fixed.bias_weights(wb.data, sc["q"])
        rep["max_bias_error"] = float(np.abs(wb.data * sc["q"] * 2.0 ** bexp - gated_bias.tocsr().data).max(initial=0))
        rep["bias_exp"] = bexp
        sparse.append(dict(weights=wb, weight_exp=bexp, num_weight_bits=8))
    return ({"sparse": sparse, "lif": lif, "in_grid": sc["in_grid"]},
            dict(process="lava", sign_mode=sc["mode"], weight_bits=8, weight_scale=sc["g"],
                 weight_exp=sparse[0]["weight_exp"], in_grid=sc["in_grid"], max_weight_error=err,
                 rel_weight_error=err / sc["wmax"] if sc["wmax"] else 0.0, **rep))


def loihi_lif_for_grid(g_y: float, c: float, v_thr: float, tau: float) -> tuple[dict, dict]:
    """A Lava ``LIFReset`` fed by one of our Op2 (an attention product or a sum) whose output lies on the grid
    ``g_y`` and enters the membrane times c = r / tau: the input quantum q = g_y c / 2^j with the largest integer j
    that keeps the threshold mantissa at most VTH_TARGET (headroom: a step's input < 64 V_th), so the Op2 sends the
    exact integers (y / g_y) * 2^j (j >= 0; rounded to nearest for j < 0). Returns (LIF kwargs, report)."""
    q0 = g_y * c
    j = math.floor(math.log2(VTH_TARGET * q0 / v_thr)) if v_thr > 0 else 0
    q = q0 / 2.0 ** j
    lif, rep = _lif_params(q, None, v_thr, tau)
    return lif, dict(process="lava (fed by ours)", input_shift=j, **rep)


def _lava_sparse(name: str, inputs, k: dict, c: float = 1.0) -> dict:
    """Lava's ``Sparse`` for a Synapse's weight (times c) on the flattened batch: block-diagonal kron(I_B, W),
    sample-major. The spec holds the per-sample W and ``block_diag`` = B; the worker builds the kron (a spec B
    times smaller: the block-diagonal matrix holds B copies of every weight)."""
    W = (_synapse_matrix(k) * c).tocsr()
    W.sum_duplicates()
    W.sort_indices()
    return dict(cls="lava:Sparse", name=name, inputs=list(inputs), in_ports=["s_in"], block_diag=int(k["in_shape"][0]),
                kwargs=dict(weights=W, num_message_bits=24))  # graded input (the stem sees real-valued pixels)


def _lava_lif(name, inputs, neu: dict, bias, T: int, lag: int) -> dict | None:
    """Our LIF Neuron as Lava's ``LIFReset`` (its input must come scaled by the returned ``scale`` = r/tau), or
    None when Lava's LIF cannot express it (see ``_lava_pair``)."""
    if neu.get("kind", "lif") != "lif" or neu.get("dtype", "float64") != "float64":
        return None
    if not _unmasked(neu.get("mask")):
        return None
    tau, r, vl, vth, vr = (_scalar(neu[q]) for q in ("tau_steps", "r", "v_leak", "v_th", "v_reset"))
    if None in (tau, r, vl, vr, vth) or vl != 0.0 or vr != 0.0 or tau < 1.0:
        return None
    vth = float(np.nextafter(vth, -np.inf))  # back to the file's v_threshold (v > vth)
    n = int(np.prod(neu["shape"]))
    return dict(cls="lava:LIFReset", name=name, inputs=list(inputs), in_ports=["a_in"], scale=r / tau,
                kwargs=dict(shape=(n,), du=1.0, dv=1.0 / tau, bias_mant=0.0 if bias is None else bias, vth=vth,
                            reset_interval=T, reset_offset=(1 + lag) % T))


def _lava_pair(syn: dict, name: str, neu: dict) -> list[dict] | None:
    """A fused Synapse -> LIF pair as Lava's own ``Sparse`` -> ``LIFReset``, or None when Lava's processes cannot
    express it exactly (token mask with dropped tokens, a non-LIF neuron, per-neuron decay / threshold, a leak or
    reset potential other than 0, fixed point or float32 arithmetic).

    Lava's LIF: ``u = u(1-du) + a_in; v = v(1-dv) + u + bias; s = v > vth; v = 0 if s``. With du = 1, dv = 1/tau,
    weights and bias scaled by r/tau it is our ``H = V + (r X - V) / tau`` (for tau = 2 bit for bit); its strict
    ``>`` is NIR's rule, so vth is the file's v_threshold (our Neuron's v_th is the next float64 above it). The
    batch is flattened sample-major: the Sparse is block-diagonal kron(I_B, W) on (B * Din,) -> (B * Dout,).
    Timing: Sparse delays one step like our Synapse; LIFReset zeroes u and v at Lava time_step % T ==
    (1 + lag) % T, i.e. at model timestep 0 of each chunk (the bias from Lava's step 0 only touches chunk -1,
    which no record reads)."""
    k = syn["kwargs"]
    if not _unmasked(k.get("mask")):
        return None
    lif = _lava_lif(name, [syn["name"]], neu, None, int(k["T"]), int(k["lag"]))
    if lif is None:
        return None
    c = lif.pop("scale")
    if k.get("bias") is not None:
        lif["kwargs"]["bias_mant"] = \
            np.broadcast_to(np.asarray(k["bias"], dtype=np.float64) * c, k["out_shape"]).reshape(-1).copy()
    return [_lava_sparse(syn["name"], syn["inputs"], k, c), lif]

def _masked_by(name: str, mask, by_name: dict) -> bool:
    """Whether process ``name``'s output is 0 at every token that ``mask`` drops at each timestep: it applies that
    same schedule itself, or it is a sum or a delay of such outputs."""
    if mask is None:
        return True
    p = by_name.get(name)
    if p is None:
        return False
    m = p["kwargs"].get("mask")
    if m is not None and np.array_equal(np.asarray(m), np.asarray(mask)):
        return True
    if p["cls"] == "Delay" or (p["cls"] == "Op2" and p["kwargs"]["kind"] == "add"):
        return all(_masked_by(i, mask, by_name) for i in p["inputs"])
    return False


def _lava_masked_pair(syn: dict, name: str, neu: dict, input_masked: bool, gates: dict) -> list[dict] | None:
    """A fused Synapse -> LIF pair of a token segment whose schedule drops tokens at some timesteps, on Lava's own
    ``Sparse`` -> ``LIFReset``, or None when it is not a per-token layer (``mode == "cf"``) with the neuron's own
    schedule. A dropped token's neuron must get no input and no bias at that timestep (our Neuron's contract); Lava's
    LIF adds its bias every step, so the bias leaves the LIF: it arrives as a second Sparse (weights b r/tau, token j
    -> every channel of token j) from our Op1 ``ones`` (1 at each kept token at t, 0 at a dropped one), summed into
    the same ``a_in``. The synapse mixes no tokens, so W x is 0 at a token whose input is 0: the input is gated by
    our Op1 ``mask`` (left out when its producer is masked by the same schedule, ``input_masked``). The membrane of
    a dropped token then decays (v (1 - dv)) and cannot spike, as in torch. Ours: the one or two Op1 gates, shared by
    every layer that reads the same input under the same schedule (Q, K, V): ``gates`` maps (kind, input, schedule)
    to the gate already built."""
    k = syn["kwargs"]
    mask = k.get("mask")
    if k["mode"] != "cf" or len(k["in_shape"]) != 3 or not np.array_equal(np.asarray(mask), np.asarray(neu.get("mask"))):
        return None
    T, lag = int(k["T"]), int(k["lag"])
    lif = _lava_lif(name, [syn["name"]], {**neu, "mask": None}, None, T, lag)
    if lif is None:
        return None
    c = lif.pop("scale")
    B, (Co, n) = k["in_shape"][0], k["out_shape"][1:]
    out, x = [], syn["inputs"][0]

    def gate(kind, base, shape) -> str:  # our Op1 at the synapse input's timing, built once per input and schedule
        key = (kind, syn["inputs"][0], np.asarray(mask).tobytes())
        if key not in gates:
            gates[key] = f"{syn['name'][:52]}.{base}"
            out.append(dict(cls="Op1", name=gates[key], inputs=[syn["inputs"][0]], in_ports=["in0"],
                            kwargs=dict(kind=kind, in_shape=k["in_shape"], out_shape=(B, *shape), params={}, T=T,
                                        lag=lag - 1, mask=mask)))
        return gates[key]

    if not input_masked:
        x = gate("mask", "gate", k["in_shape"][1:])
    out.append(_lava_sparse(syn["name"], [x], k, c))
    if k.get("bias") is not None:
        ones = gate("ones", "ones", (1, n))
        b = np.broadcast_to(np.asarray(k["bias"], dtype=np.float64), (Co, n)).reshape(-1) * c
        W = sp.csr_matrix((b, (np.arange(Co * n), np.tile(np.arange(n), Co))), shape=(Co * n, n))
        W.eliminate_zeros()
        bias = dict(cls="lava:Sparse", name=f"{syn['name'][:52]}.bias", inputs=[ones], in_ports=["s_in"],
                    block_diag=B, gated_bias=True, kwargs=dict(weights=W, num_message_bits=24))
        out.append(bias)
        lif["inputs"] = [syn["name"], bias["name"]]
        lif["in_ports"] = ["a_in", "a_in"]
    return out + [lif]


# ------------------------------------------------------------------------------------------- lowering
def _conv_matrix(w: np.ndarray, in_shape, stride, padding, dilation, groups) -> tuple[sp.csr_matrix, tuple]:
    """A conv2d (torch semantics, zero padding) as a sparse (Co*Ho*Wo, Ci*H*W) matrix; zero weights skipped."""
    Ci, H, W = in_shape
    Co, cig, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = conv_len(H, kh, sh, ph, dh), conv_len(W, kw, sw, pw, dw)
    cog = Co // groups
    oy, ox = np.meshgrid(np.arange(Ho), np.arange(Wo), indexing="ij")
    opix = (oy * Wo + ox).ravel()
    co = np.arange(Co)
    gi = co // cog
    rows, cols, vals = [], [], []
    for i in range(kh):
        for j in range(kw):
            iy, ix = (oy * sh - ph + i * dh).ravel(), (ox * sw - pw + j * dw).ravel()
            ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            if not ok.any():
                continue
            op_, ip_ = opix[ok], (iy * W + ix)[ok]
            for c in range(cig):
                wv = w[:, c, i, j]  # (Co,)
                nz = np.flatnonzero(wv)
                if nz.size == 0:
                    continue
                ci = gi[nz] * cig + c  # input channel of each output channel
                rows.append((nz[:, None] * Ho * Wo + op_[None, :]).ravel())
                cols.append((ci[:, None] * H * W + ip_[None, :]).ravel())
                vals.append(np.repeat(wv[nz], op_.size))
    if rows:
        r, c_, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    else:
        r = c_ = np.zeros(0, dtype=np.int64)
        v = np.zeros(0)
    return sp.csr_matrix((v, (r, c_)), shape=(Co * Ho * Wo, Ci * H * W)), (Co, Ho, Wo)


def _low_output(bld, g, op, x, mask):
    return x if mask is None else bld.op1("mask", x, x.shape, op.name, mask=mask)


def _low_affine(bld, g, op, x, mask):
    W, b = op.weight, op.bias
    if W.shape[-1] != x.shape[-1]:
        raise NirFormatError(f"Affine {op.name!r}: weight takes {W.shape[-1]} inputs, its input has shape {x.shape}")
    return bld.synapse(x, W, np.broadcast_to(b, op.shape), op.shape, op.name, "affine", mask)


def _low_conv2d(bld, g, op, x, mask):
    w, b = op.weight, op.bias
    if len(x.shape) != 3:
        raise NirFormatError(f"Conv2d {op.name!r}: input shape {x.shape} is not (C, H, W)")
    bias = None if b is None else np.asarray(b, dtype=np.float64).reshape(-1, 1, 1)
    if w.shape[2:] == (1, 1) and op.groups == 1 and op.stride == (1, 1) and op.padding == (0, 0):
        return bld.synapse(x, w[:, :, 0, 0], bias, op.shape, op.name, "cf", mask)  # per-position (token) linear
    M, shape = _conv_matrix(w, x.shape, op.stride, op.padding, op.dilation, op.groups)
    if tuple(shape) != tuple(op.shape):
        raise NirFormatError(f"Conv2d {op.name!r}: computed output {shape} but the graph says {op.shape}")
    return bld.synapse(x, M, None if bias is None else np.broadcast_to(bias, shape), op.shape, op.name, "sparse", mask)


def _low_conv1d(bld, g, op, x, mask):
    """A Conv1d over a token row (C, L): a 1x1 kernel is a per-token matmul, any other the sparse matrix of the
    same conv on a height-1 image (C, 1, L) (same memory layout as (C, L))."""
    w, b = op.weight, op.bias
    if len(x.shape) != 2:
        raise NirFormatError(f"Conv1d {op.name!r}: input shape {x.shape} is not (C, L)")
    bias = None if b is None else np.asarray(b, dtype=np.float64).reshape(-1, 1)
    if w.shape[2] == 1 and op.groups == 1 and op.stride == 1 and op.padding == 0:
        return bld.synapse(x, w[:, :, 0], bias, op.shape, op.name, "cf", mask)  # per-token linear
    M, shape = _conv_matrix(w[:, :, None, :], (x.shape[0], 1, x.shape[1]), (1, op.stride), (0, op.padding),
                            (1, op.dilation), op.groups)
    if (shape[0], shape[2]) != tuple(op.shape):
        raise NirFormatError(f"Conv1d {op.name!r}: computed output {(shape[0], shape[2])} but the graph says "
                             f"{op.shape}")
    return bld.synapse(x, M, None if bias is None else np.broadcast_to(bias, op.shape), op.shape, op.name, "sparse",
                       mask)


def _low_sumpool2d(bld, g, op, x, mask):
    C = x.shape[0]
    w = np.ones((C, 1, *op.kernel))
    M, shape = _conv_matrix(w, x.shape, op.stride, op.padding, (1, 1), C)
    return bld.synapse(x, M, None, op.shape, op.name, "sparse", mask)


def _low_flatten(bld, g, op, x, mask):
    return bld.op1("reshape", x, op.shape, op.name, mask=mask, out_reshape=tuple(op.shape))


def _low_lif(bld, g, op, x, mask):
    # NIR fires at v > v_threshold; our Neuron at H >= v_th: the next float64 above is the same rule exactly
    v_th = np.nextafter(op.v_threshold, np.inf)
    return bld.neuron(x, op.name, "lif", mask, tau_steps=op.tau_steps, r=op.r, v_leak=op.v_leak,
                      v_th=v_th, v_reset=op.v_reset)


LOWER = {  # lowered node type (stata_deploy.ir.lowered) -> lowering; InputPort is the image or a host result
    OutputPort: _low_output,
    Affine: _low_affine,
    Conv1d: _low_conv1d,
    Conv2d: _low_conv2d,
    SumPool2d: _low_sumpool2d,
    Flatten: _low_flatten,
    LIF: _low_lif,
}


def _heads_args(prefix: str, heads: int, shape, perm) -> dict:
    """Split a token row (D, n) / (D, 1, n) or map (D, g, g) (tokens = flattened h, w) into (H, dh, n) [+ perm]."""
    D = shape[0]
    n = int(np.prod(shape[1:]))
    return {f"{prefix}_reshape": (heads, D // heads, n), f"{prefix}_perm": perm}


_NT = (0, 1, 3, 2)  # (B, H, dh, n) <-> (B, H, n, dh)


def _rows_shape(h, x: _Node) -> tuple:
    """The port shape (D, n) / (D, 1, n) / (D, g, g) of a host op's token-row operand."""
    if len(x.shape) not in (2, 3):
        raise NirFormatError(f"host operation {h.name!r}: operands must be token rows (D, n) / (D, 1, n) or maps "
                             f"(D, g, g), got shape {x.shape}")
    return x.shape


# one function per host-op kind (runtimes.nir_graph.HOST_KINDS): (bld, h, mask, *inputs) -> _Node
def _matmul(bld, h, a, b, out_shape, mask=None, **args):
    """A product of two activations (an Op2 matmul), times the Product's ``scale``; in fixed point its values lie
    on the grid a.grid * b.grid * |scale|."""
    scale = float(h.node.scale)
    return bld.op2("matmul", a, b, out_shape, h.name, grid=a.grid * b.grid * abs(scale), mask=mask,
                   **({"scale": scale} if scale != 1.0 else {}), **args)


def _lh_qk(bld, h, mask, q, k):
    H, shape = h.node.heads, _rows_shape(h, q)
    n = int(np.prod(shape[1:]))
    return _matmul(bld, h, q, k, (H, n, n), **_heads_args("a", H, shape, _NT),
                   **_heads_args("b", H, _rows_shape(h, k), None))


def _lh_av(bld, h, mask, a, v):
    H, shape = h.node.heads, _rows_shape(h, v)
    return _matmul(bld, h, a, v, shape, mask, **_heads_args("b", H, shape, _NT), out_perm=_NT, out_reshape=shape)


def _lh_ktv(bld, h, mask, k, v):
    H, shape = h.node.heads, _rows_shape(h, k)
    dh = shape[0] // H
    return _matmul(bld, h, k, v, (H, dh, dh), **_heads_args("a", H, shape, None),
                   **_heads_args("b", H, _rows_shape(h, v), _NT))


def _lh_qktv(bld, h, mask, q, m):
    H, shape = h.node.heads, _rows_shape(h, q)
    return _matmul(bld, h, q, m, shape, mask, **_heads_args("a", H, shape, _NT), out_perm=_NT, out_reshape=shape)


def _lh_relu(bld, h, mask, x):
    return bld.neuron(x, h.name, "relu", mask)


def _lh_ternary(bld, h, mask, x):
    vr = float(h.node.v_reset)
    return bld.neuron(x, h.name, "ternary", mask, tau_steps=float(h.node.tau), r=1.0, v_leak=vr,
                      v_th=float(h.node.v_th), v_reset=vr)


LOWER_HOST = {"qk": _lh_qk, "av": _lh_av, "ktv": _lh_ktv, "qktv": _lh_qktv, "relu": _lh_relu,
              "ternary": _lh_ternary}


def _low_host(bld, g, h, nodes) -> _Node:
    """A host operation (an IR node NIR cannot express) as Lava processes, its host-op inputs first (each lowered
    once: ``nodes`` holds them under their names). Neurons with a ``layer`` are recorded."""
    if h.name in nodes:
        return nodes[h.name]
    fn = LOWER_HOST.get(h.kind)
    if fn is None:
        raise UnsupportedOpError(f"host operation {h.name!r} of kind {h.kind!r} has no Lava lowering "
                                 f"(supported: {', '.join(LOWER_HOST)})")
    by_name = {o.name: o for o in g.host_ops}
    ins = [_low_host(bld, g, by_name[p], nodes) if p in by_name else nodes[p] for p in h.inputs]
    mask = g.segments[h.tokens].schedule if h.tokens else None
    y = nodes[h.name] = fn(bld, h, mask, *ins)
    if h.layer:
        shape = y.shape
        lay = "tokens" if (len(shape) == 2 or shape[1] == 1) else "grid_tokens"
        bld.record(h.layer, y, (lay, h.tokens))
    return y


def lower_graph(g, batch: int, precision: str, dtype: str = "float64") -> _Builder:
    """Lower a lowered IR graph (``stata_deploy.ir.lowered``, read by ``runtimes.nir_graph``) to Lava process
    specs, node by node in topological order."""
    bld = _Builder(g.T, batch, precision, dtype)
    if g.input is None or g.logits is None:
        raise NirFormatError("this NIR file is not a complete stata-deploy model graph (no image input or logits "
                             "port; a --split segment?): the Lava runtime runs whole models")
    host_by_out = {h.output: h for h in g.host_ops}
    nodes: dict[str, _Node] = {}
    for name, op in g.ops.items():
        mask = g.segments[op.tokens].schedule if op.tokens else None
        if isinstance(op, InputPort):
            if name == g.input:
                nodes[name] = bld.input(op.shape)
            elif name in host_by_out:
                nodes[name] = _low_host(bld, g, host_by_out[name], nodes)
            else:
                raise UnsupportedOpError(f"input port {name!r} has no source in this graph (not the image input "
                                         "and no host operation writes it)")
            continue
        if type(op) not in LOWER:
            raise UnsupportedOpError(f"node {name!r} of type {type(op).__name__} has no Lava lowering "
                                     f"(supported: {', '.join(t.__name__ for t in LOWER)})")
        ins = g.inputs[name]
        if not ins:
            raise NirFormatError(f"node {name!r} has no inputs")
        x = nodes[ins[0]]
        for s in ins[1:]:  # several edges into one node are summed (delay-matched)
            x = bld.add(x, nodes[s], name + ".sum")
        y = LOWER[type(op)](bld, g, op, x, mask)
        nodes[name] = y
        if op.layer:
            bld.record(op.layer, y, (op.layout, op.tokens))
    bld.record("logits", nodes[g.logits], ("logits", None))
    return bld

# -------------------------------------------------------------------------------------------- the runtime
def _lava_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lava") is not None


class LavaRuntime(Runtime):
    """Runtime ``lava``: a .nir file exported by stata-deploy (or a run folder) on Lava's CPU simulator."""

    name = "lava"
    accepts = ("precision", "timeout")

    def __init__(self, path, precision: str = "float", timeout: float = 600.0, batch: int | None = None,
                 dtype: str = "float64", lava_procs: bool = True, netx_input: bool = False, **options):
        """precision: 'float' | 'fixed'; timeout: seconds any single answer of the simulation may take (build,
        compile, or one run call) before its process group is killed; batch: samples simulated in parallel (one
        network build; a run of B samples streams ceil(B / batch) chunks); dtype: neuron arithmetic in float mode.
        Other options the CLI passes (hardware, threads) do not change the simulation: energy is computed from the
        returned spikes by the shared counter. lava_procs: build the standard layers (synapse + LIF pairs) on Lava's
        own ``Sparse`` + ``LIFReset`` where they are exact (float precision; see ``_lava_pair``; in fixed precision
        their bit-accurate models); False: all ours. netx_input (fixed point): quantise the image layer as the
        netx exporter must (no weight exponent: a coarser pixel grid; see ``stata_deploy.loihi_fixed``)."""
        super().__init__(path)
        if precision not in PRECISIONS:
            raise StataError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not _lava_available():
            raise StataError("the lava runtime needs Lava: run `bash scripts/install_lava.sh .venv` "
                             "(lava-nc 0.10.0, patched for Python 3.11)")
        self.precision = precision
        self.timeout = float(timeout) if timeout else 600.0
        self.graph, self.cfg, self.masks = _load_nir(self.path)
        self.description = self.graph.meta  # the exporter's description (config, masks, weights_sha256)
        self.batch = int(batch) if batch else 32
        if self.batch < 1:
            raise StataError("batch must be >= 1")
        t0 = time.perf_counter()
        self._builder = lower_graph(self.graph, self.batch, precision, dtype)
        self._builder.netx_input = bool(netx_input)
        self.lower_seconds = time.perf_counter() - t0
        self.depth = self._builder.depth  # steps from input to logits
        self.lava_procs = bool(lava_procs)
        # which processes of the built network are Lava's own ("lava.proc.sparse.Sparse": n) and which ours
        self.process_kinds = self._builder.process_kinds(lava_procs=self.lava_procs)
        self.quantisation = self._builder.quant
        self._worker: _Worker | None = None
        self.last_worker: _Worker | None = None  # kept after a kill (tests check its process group and memory)
        self.build_seconds = 0.0  # worker start + Lava process construction
        self.compile_seconds = 0.0  # first run: Lava compile + process start
        self.stats: list[dict] = []
        self._finalizer = weakref.finalize(self, _Runtime_cleanup, [None])

    # ---------------------------------------------------------------------------------------------
    def _ensure_worker(self) -> "_Worker":
        if self._worker is None or not self._worker.alive:
            t0 = time.perf_counter()
            # the host reads every Extractor once per step: 4 slots suffice
            spec = self._builder.spec(buffer=4, lava_procs=self.lava_procs)
            self._worker = self.last_worker = _Worker(spec, self.timeout)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _Runtime_cleanup, [self._worker])
            self._worker.start()
            self.build_seconds = time.perf_counter() - t0
        return self._worker

    def run(self, x: np.ndarray, record: bool = True) -> RunResult:
        cfg = self.cfg
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = np.broadcast_to(x[None], (cfg.T, *x.shape))
        want = (cfg.in_channels, cfg.img_size, cfg.img_size)
        if x.ndim != 5 or x.shape[0] != cfg.T or tuple(x.shape[2:]) != want:
            raise DataError(f"input shape {tuple(x.shape)} does not match the model: expected (B, {want[0]}, "
                            f"{want[1]}, {want[2]}) or ({cfg.T}, B, {want[0]}, {want[1]}, {want[2]})")
        B = x.shape[1]
        Bc = self.batch
        K = -(-B // Bc)
        xp = np.zeros((cfg.T, K * Bc, *want), dtype=np.float64)
        xp[:, :B] = x
        xk = xp.reshape(cfg.T, K, Bc, *want).swapaxes(0, 1)  # (K, T, Bc, C, H, W)
        worker = self._ensure_worker()
        t0 = time.perf_counter()
        res, stats = worker.request(np.ascontiguousarray(xk))
        seconds = time.perf_counter() - t0
        if stats.get("first_run_seconds"):
            self.compile_seconds = stats["first_run_seconds"]
        stats = {**stats, "samples": B, "wall_seconds": seconds}
        self.stats.append(stats)
        logits_t = res.pop("logits")[:, :B].reshape(cfg.T, B, -1).astype(np.float32)
        spikes, kept = self._to_slots({k: v[:, :B] for k, v in res.items()}, B) if record else ({}, self._kept(B))
        return RunResult(logits_t, spikes, x.copy(), seconds, kept)

    # ---------------------------------------------------------------------------------------------
    def _kept(self, B: int) -> dict[int, np.ndarray]:
        g, kept = self.graph, {}
        for site, sid in g.sites.items():
            pos = np.stack([g.kept_positions(sid, t) for t in range(g.T)])  # (T, k), ascending
            kept[int(site)] = np.broadcast_to(pos[:, None, :], (g.T, B, pos.shape[1])).astype(np.int64).copy()
        return kept

    def _to_slots(self, res: dict, B: int):
        from runtimes.nir_graph import _to_torch_layout

        spikes = {}
        for name, a in res.items():
            layout, tokens = self._builder.layouts[name]
            spikes[name] = _to_torch_layout(self.graph, layout, tokens, a).astype(np.float32)
        return spikes, self._kept(B)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self._finalizer.detach()


def _Runtime_cleanup(holder):
    w = holder[0]
    if w is not None:
        w.kill()


def _load_nir(path: Path):
    """(IR graph, ModelConfig, TokenMasks | None) from a .nir file exported by stata-deploy."""
    from stata_deploy.config import ModelConfig
    from stata_deploy.pruning.masks import TokenMasks

    from runtimes.nir_graph import read_graph

    p = Path(path)
    if p.is_dir():
        raise StataError(f"{p} is a folder; the lava runtime runs a .nir file (stata-deploy export {p} --to nir)")
    g = read_graph(p)
    if g.meta.get("format") != "stata-deploy-nir" or not g.meta.get("config"):
        raise NirFormatError(f"{p} is a NIR file, but not one exported by stata-deploy (no 'stata_deploy' "
                             "description in its metadata): the lava runtime needs our model description")
    cfg = ModelConfig.from_dict(g.meta["config"])
    masks = TokenMasks.from_json(g.meta["masks"]) if g.meta.get("masks") else None
    return g, cfg, masks
