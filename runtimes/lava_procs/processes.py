"""Custom Lava processes (AbstractProcess + PyLoihiProcessModel), numpy only. See the package docstring.

- ``Synapse``: y = W x + b per group (a per-token Linear, or a conv unrolled into a sparse matrix), with the one-step
  delay of ``lava.proc.dense.Dense`` (it sends last step's result, then computes this step's).
- ``Neuron``: the SpikingJelly-form LIF of ``stata_deploy.nn.neurons`` (fires at H >= V_th, hard reset; Lava's LIF
  fires at v > vth and cannot reproduce the ties), its ternary variant, and the stateless ReLU; optional per-timestep
  token mask (a dropped token gets no input, so its membrane decays and it stays silent); ``grid`` > 0 rounds the
  leak step down to a fixed-point grid (Loihi-like integer arithmetic, used by ``precision='fixed'``).
- ``SynapseNeuron``: a Synapse feeding only one Neuron, fused (same timing, one process instead of two).
- ``Op1`` / ``Op2``: combinational ops with one or two inputs (attention products, summed edges, reshapes, masks).
- ``Delay``: an n-step delay line, to delay-match residual branches.

Two process models per process: ``floating_pt`` (float64 ports, as above) and ``fixed_pt`` (what the worker selects
with ``Loihi2SimCfg(select_tag="fixed_pt")``, beside Lava's bit-accurate ``Sparse`` / ``LIFReset`` models). A fixed
model talks integers at every port, like the Loihi processes it sits between: input ``i`` arrives as integers in
units of ``in_grids[i]`` (its value is ``int * in_grids[i]``), the model computes on those values exactly as the
float model does (the spec builder put weights, biases and neuron state on power-of-two grids), and it sends
``rint(y / out_grid)`` as int32. ``runtimes.lava_runtime`` (``_Builder._fixed_point``) sets both grids and
documents the scaling at each boundary.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import traceback

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

from runtimes.lava_procs.kernels import KERNELS, _token_mask  # absolute: Lava loads this file as a top-level module


def _model_t(model) -> int:
    """Model timestep this process is at (see package docstring)."""
    p = model.proc_params
    return (model.time_step - 1 - p["lag"]) % p["T"]


class _FloatIO:
    """floating_pt: values travel as float64."""

    def _x(self, i: int, x: np.ndarray) -> np.ndarray:
        return x

    def _y(self, y: np.ndarray) -> np.ndarray:
        return y


class _FixedIO:
    """fixed_pt: integers at every port; input i is in units of ``in_grids[i]``, the output in units of
    ``out_grid`` (round to nearest; exact where the value lies on the grid)."""

    def _x(self, i: int, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * self.proc_params["in_grids"][i]

    def _y(self, y: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(y, dtype=np.float64) / self.proc_params["out_grid"]).astype(np.int32)


_FLOAT_OUT = LavaPyType(PyOutPort.VEC_DENSE, float)
_INT_OUT = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)


def _fail_fast(run_spk):
    """A process model that raises leaves Lava's other processes waiting on its ports for ever: the simulation
    hangs until the runtime's timeout with nothing on stderr (measured: a NameError in a kernel, 300 s, empty
    stderr). Instead: print the traceback and kill the worker's process group (Lava's processes are forked into
    it), so the runtime reports "exited unexpectedly" with the traceback at once and cleans up as after a crash."""
    @functools.wraps(run_spk)
    def run(self):
        try:
            run_spk(self)
        except BaseException:
            if "STATA_LAVA_PARENT" not in os.environ:  # not in our worker's own process group: Lava's behaviour
                raise
            traceback.print_exc()
            sys.stderr.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)
    return run


def _models(proc, base, out: str):
    """The floating_pt and fixed_pt process models of ``proc`` from one implementation ``base`` (run_spk reading
    inputs through ``self._x`` and sending through ``self._y``), ``out`` the name of its OutPort."""
    made = []
    for io, tg, port in ((_FloatIO, "floating_pt", _FLOAT_OUT), (_FixedIO, "fixed_pt", _INT_OUT)):
        name = base.__name__.lstrip("_") + ("Float" if io is _FloatIO else "Fixed")
        cls = type(name, (io, base), {out: port, "__module__": base.__module__, "__qualname__": name,
                                      "run_spk": _fail_fast(base.run_spk)})
        made.append(tag(tg)(requires(CPU)(implements(proc=proc, protocol=LoihiProtocol)(cls))))
    return made


# --------------------------------------------------------------------------------------------- Synapse
class Synapse(AbstractProcess):
    """A synaptic layer with one step of delay; the input (B, *in_shape) -> output (B, *out_shape).

    mode 'sparse': weight a scipy.sparse (Dout, Din) on the flattened sample (a conv or pool unrolled);
    mode 'cf': weight (Co, Ci) applied over axis 1 (a 1x1 conv: y[b] = W @ x[b].reshape(Ci, -1));
    mode 'affine': weight (..., out, in) over the last axis, leading axes per position (NIR's batched Affine).
    bias: None or an array broadcastable to (B, *out_shape). mask/T/lag: per-timestep token mask on the output
    (last axis), as the IR masks every op of a token segment.
    """

    def __init__(self, *, in_shape, out_shape, weight, bias=None, mode="sparse", mask=None, T=1, lag=0, **kw):
        super().__init__(in_shape=tuple(in_shape), out_shape=tuple(out_shape), weight=weight, bias=bias, mode=mode,
                         mask=mask, token_axis=-1, T=int(T), lag=int(lag), **kw)
        self.s_in = InPort(shape=tuple(in_shape))
        self.a_out = OutPort(shape=tuple(out_shape))


class _PySynapseModel(PyLoihiProcessModel):
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self._syn = _SynapseState(self.proc_params)

    def run_spk(self):
        self.a_out.send(self._y(self._syn.output(_model_t(self))))
        self._syn.receive(self._x(0, self.s_in.recv()))


PySynapseModelFloat, PySynapseModelFixed = _models(Synapse, _PySynapseModel, "a_out")


class _SynapseState:
    """The numpy part of a Synapse: a one-step buffer of W x + b."""

    def __init__(self, p):
        self.p = p
        self.w = p["weight"].tocsr() if p["mode"] == "sparse" else p["weight"]
        self.b = p["bias"]
        self.buf = np.zeros(p["out_shape"])

    def output(self, t: int) -> np.ndarray:
        m = _token_mask(self.p, t, self.buf.ndim)
        return self.buf if m is None else self.buf * m

    def receive(self, x: np.ndarray) -> None:
        p = self.p
        B = x.shape[0]
        if p["mode"] == "sparse":
            y = (self.w @ x.reshape(B, -1).T).T
        elif p["mode"] == "cf":
            y = self.w @ x.reshape(B, x.shape[1], -1)
        else:  # affine over the last axis
            y = (self.w @ x[..., None])[..., 0]
        y = y.reshape(p["out_shape"])
        if self.b is not None:
            y = y + self.b
        self.buf = y


# ---------------------------------------------------------------------------------------------- Neuron
class Neuron(AbstractProcess):
    """kind 'lif' | 'ternary': the NIR LIF under forward Euler, SpikingJelly tie rule (ours)::

        H = V + (r * X - (V - v_leak)) / tau_steps;  S = H >= v_th  (ternary: -1 where H <= -v_th);
        V = v_reset where S != 0 else H

    kind 'relu': max(X, 0) (stateless). Parameters are scalars or arrays broadcastable to ``shape``.
    T, lag: pipelining (state reset at model timestep 0). mask: (T, n) bool on axis ``token_axis`` (a masked
    token gets no input). grid > 0: fixed point as on Loihi: with the weights on ``grid`` and 1/tau folded in, the
    state lives on grid/tau; each step the decayed state ``V - (V - v_leak) / tau_steps`` is truncated to that grid
    (an integer shift) and the input ``r X / tau_steps`` is added exactly. dtype: the state's arithmetic dtype.
    """

    def __init__(self, *, shape, kind="lif", tau_steps=2.0, r=1.0, v_leak=0.0, v_th=1.0, v_reset=0.0, T=1, lag=0,
                 mask=None, token_axis=-1, grid=0.0, dtype="float64", **kw):
        super().__init__(shape=tuple(shape), kind=kind, tau_steps=tau_steps, r=r, v_leak=v_leak, v_th=v_th,
                         v_reset=v_reset, T=int(T), lag=int(lag), mask=mask, token_axis=int(token_axis),
                         grid=float(grid), dtype=dtype, **kw)
        self.a_in = InPort(shape=tuple(shape))
        self.s_out = OutPort(shape=tuple(shape))


class _PyNeuronModel(PyLoihiProcessModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self._neu = _NeuronState(self.proc_params)

    def run_spk(self):
        self.s_out.send(self._y(self._neu.step(self._x(0, self.a_in.recv()), _model_t(self))))


PyNeuronModelFloat, PyNeuronModelFixed = _models(Neuron, _PyNeuronModel, "s_out")


class _NeuronState:
    """The numpy part of a Neuron (see ``Neuron``)."""

    def __init__(self, p):
        self.p = p
        self.dt = np.dtype(p["dtype"])
        self.c = {k: np.asarray(p[k], dtype=self.dt) for k in ("tau_steps", "r", "v_leak", "v_th", "v_reset")}
        self.v = np.broadcast_to(self.c["v_reset"], p["shape"]).astype(self.dt)

    def step(self, x: np.ndarray, t: int) -> np.ndarray:
        p, c = self.p, self.c
        x = x.astype(self.dt)
        m = _token_mask(p, t, x.ndim)
        if m is not None:
            x = x * m
        if p["kind"] == "relu":
            return np.maximum(x, 0).astype(float)
        if t == 0:
            self.v = np.broadcast_to(c["v_reset"], p["shape"]).astype(self.dt)
        v = self.v
        if p["grid"] > 0:  # fixed point: the decayed state is truncated to the grid, the input added exactly
            g = p["grid"] / c["tau_steps"]  # state grid: weights (grid) with 1/tau folded in, as on Loihi
            h = np.floor((v - (v - c["v_leak"]) / c["tau_steps"]) / g) * g + c["r"] * x / c["tau_steps"]
        else:
            h = v + (c["r"] * x - (v - c["v_leak"])) / c["tau_steps"]  # the reader's (and torch's) operation order
        s = (h >= c["v_th"]).astype(self.dt)
        if p["kind"] == "ternary":
            s = s - (h <= -c["v_th"]).astype(self.dt)
        self.v = np.where(s != 0, c["v_reset"], h).astype(self.dt)
        return s.astype(float)


# ---------------------------------------------------------------------------------------- SynapseNeuron
class SynapseNeuron(AbstractProcess):
    """A Synapse feeding only one Neuron, fused into one process (fewer processes: faster start and steps).
    Same timing as the pair: one step of delay, then the neuron in the same step. ``syn`` / ``neu``: the
    keyword arguments of ``Synapse`` / ``Neuron``; both use the synapse's lag."""

    def __init__(self, *, syn: dict, neu: dict, **kw):
        syn, neu = dict(syn), dict(neu)
        super().__init__(syn=syn, neu=neu, T=int(syn["T"]), lag=int(syn["lag"]), **kw)
        self.s_in = InPort(shape=tuple(syn["in_shape"]))
        self.s_out = OutPort(shape=tuple(neu["shape"]))


class _PySynapseNeuronModel(PyLoihiProcessModel):
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        p = self.proc_params
        self._syn = _SynapseState({**p["syn"], "token_axis": -1})
        self._neu = _NeuronState(p["neu"])

    def run_spk(self):
        t = _model_t(self)
        self.s_out.send(self._y(self._neu.step(self._syn.output(t), t)))
        self._syn.receive(self._x(0, self.s_in.recv()))


PySynapseNeuronModelFloat, PySynapseNeuronModelFixed = _models(SynapseNeuron, _PySynapseNeuronModel, "s_out")


# ------------------------------------------------------------------------------------------ Op1 / Op2
class Op1(AbstractProcess):
    """out = KERNELS[kind](params, t, x), combinational. params: a dict of numpy/python values."""

    def __init__(self, *, kind, in_shape, out_shape, params=None, T=1, lag=0, mask=None, **kw):
        if kind not in KERNELS:
            raise ValueError(f"unknown op kind {kind!r}")
        super().__init__(kind=kind, params=dict(params or {}), T=int(T), lag=int(lag), out_shape=tuple(out_shape),
                         mask=mask, token_axis=-1, **kw)
        self.in0 = InPort(shape=tuple(in_shape))
        self.out = OutPort(shape=tuple(out_shape))


class _PyOp1Model(PyLoihiProcessModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def run_spk(self):
        p = self.proc_params
        t = _model_t(self)
        y = np.asarray(KERNELS[p["kind"]](p["params"], t, self._x(0, self.in0.recv())), dtype=float)
        y = y.reshape(p["out_shape"])
        m = _token_mask(p, t, y.ndim)
        self.out.send(self._y(y if m is None else y * m))


PyOp1ModelFloat, PyOp1ModelFixed = _models(Op1, _PyOp1Model, "out")


class Op2(AbstractProcess):
    """out = KERNELS[kind](params, t, a, b) * out_scale, combinational (attention products, residual adds).
    out_scale: r / tau of a Lava LIF it feeds (Lava's LIF integrates its input unscaled)."""

    def __init__(self, *, kind, a_shape, b_shape, out_shape, params=None, T=1, lag=0, mask=None, out_scale=1.0,
                 **kw):
        if kind not in KERNELS:
            raise ValueError(f"unknown op kind {kind!r}")
        super().__init__(kind=kind, params=dict(params or {}), T=int(T), lag=int(lag), out_shape=tuple(out_shape),
                         mask=mask, token_axis=-1, out_scale=float(out_scale), **kw)
        self.in0 = InPort(shape=tuple(a_shape))
        self.in1 = InPort(shape=tuple(b_shape))
        self.out = OutPort(shape=tuple(out_shape))


class _PyOp2Model(PyLoihiProcessModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in1: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def run_spk(self):
        p = self.proc_params
        t = _model_t(self)
        y = KERNELS[p["kind"]](p["params"], t, self._x(0, self.in0.recv()), self._x(1, self.in1.recv()))
        y = np.asarray(y, dtype=float).reshape(p["out_shape"])
        if p["out_scale"] != 1.0:
            y = y * p["out_scale"]
        m = _token_mask(p, t, y.ndim)
        self.out.send(self._y(y if m is None else y * m))


PyOp2ModelFloat, PyOp2ModelFixed = _models(Op2, _PyOp2Model, "out")


# ----------------------------------------------------------------------------------------------- Delay
class Delay(AbstractProcess):
    """out(step) = in(step - steps); zeros before that."""

    def __init__(self, *, shape, steps, **kw):
        if int(steps) < 1:
            raise ValueError("a Delay needs steps >= 1")
        super().__init__(shape=tuple(shape), steps=int(steps), **kw)
        self.in0 = InPort(shape=tuple(shape))
        self.out = OutPort(shape=tuple(shape))


class _PyDelayModel(PyLoihiProcessModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        p = self.proc_params
        self._buf = [np.zeros(p["shape"]) for _ in range(p["steps"])]

    def run_spk(self):
        self.out.send(self._y(self._buf.pop(0)))
        self._buf.append(self._x(0, self.in0.recv()))


PyDelayModelFloat, PyDelayModelFixed = _models(Delay, _PyDelayModel, "out")
