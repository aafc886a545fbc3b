"""ONNX Runtime adapter (``--runtime onnxruntime``): runs a ``.onnx`` file written by ``stata-deploy export --to onnx``.

The file describes itself (``metadata_props["stata_deploy"]``, see ``exporters/onnx_exporter.py``): the model
config, the static masks (also present as ``stata_mask_site<i>`` initializers; both must agree, and so must the
graph's constant token indices ``stata_gather_site<i>[_t<t>]``) and the run folder
it came from. ``run`` returns the same ``RunResult`` as the torch reference: logits per timestep, every neuron layer's
spikes (graph outputs named by torch module path), the encoded input, wall time and the kept token positions.
Only the CPU execution provider is used (the edge path); ``threads`` sets intra-op threads (default: one per
physical core), execution is sequential, graph optimisation ``ORT_ENABLE_ALL`` unless ``optimization`` says
otherwise. ``run(x, record=False)`` fetches only ``logits_t`` (and kept positions).

Loading refuses, with one line naming the file: an invalid model config in the description (strict types and
bounds of ``ModelConfig.validate``), a description whose T disagrees with its config or with the graph's input
``x`` (T, batch, C, H, W), and NaN/infinite values in any initializer or Constant tensor (named).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stata_deploy.config import ModelConfig
from stata_deploy.errors import ConfigError, StataError
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.results import RunResult
from stata_deploy.runtime_api import Runtime

from stata_deploy.description import META_KEY  # noqa: E402
MASK_PREFIX = "stata_mask_site"
GATHER_PREFIX = "stata_gather_site"


def read_description(path: str | Path) -> tuple[dict, "object"]:
    """(description dict, onnx ModelProto without external data) of a stata-deploy ONNX file; clear errors."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise StataError(f"model file not found: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise StataError(f"{p} is not an ONNX file ({type(e).__name__})") from None
    if not len(proto.graph.node) or not proto.opset_import:
        raise StataError(f"{p} is not an ONNX file (no graph)")
    meta = {m.key: m.value for m in proto.metadata_props}
    if META_KEY not in meta:
        raise StataError(f"{p} is an ONNX file but was not made by stata-deploy (no '{META_KEY}' metadata); "
                         "export one with: stata-deploy export RUN --to onnx")
    try:
        desc = json.loads(meta[META_KEY])
        if not isinstance(desc, dict) or "config" not in desc:
            raise ValueError("no model config")
    except ValueError as e:
        raise StataError(f"{p}: its stata-deploy description is damaged ({e})") from None
    return desc, proto


def _tensor_arrays(proto):
    """(kind, name, numpy array) of every initializer and Constant-node tensor stored inside the file (external
    data is not loaded here, so such tensors are skipped)."""
    from onnx import TensorProto, numpy_helper

    def arr(t):
        if t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    for t in proto.graph.initializer:
        yield "initializer", t.name, arr(t)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            name = node.output[0] if node.output else node.name
            for a in node.attribute:
                if a.name == "value":
                    yield "constant", name, arr(a.t)
                elif a.name in ("value_float", "value_floats"):
                    vals = [a.f] if a.name == "value_float" else list(a.floats)
                    yield "constant", name, np.asarray(vals, np.float32)


def check_finite_tensors(proto, path) -> None:
    """Refuse a graph whose weights (initializers, Constant nodes) hold NaN or infinite values, naming the tensor."""
    for kind, name, a in _tensor_arrays(proto):
        if a is None or a.dtype.kind not in "fc":
            continue
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise StataError(f"{path}: {kind} {name!r} contains NaN or infinite values ({bad} of {a.size}); "
                             "the file is damaged or was exported from broken weights")


def check_description(desc: dict, proto, path) -> ModelConfig:
    """The description's model config (strictly validated), its T, and the graph's input 'x' must all agree:
    (T, batch, C, H, W) with T, C, H, W from the config. Returns the config."""
    try:
        cfg = ModelConfig.from_dict(desc["config"])
    except (TypeError, StataError) as e:
        raise StataError(f"{path}: invalid model config in its description ({e})") from None
    T = desc.get("T", cfg.T)
    if type(T) is not int or T != cfg.T:
        raise StataError(f"{path}: its description says T={T!r} but its model config says T={cfg.T}")
    inits = {t.name for t in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in inits}
    if "x" not in inputs:
        raise StataError(f"{path}: the graph has no input 'x' (inputs: {', '.join(sorted(inputs)) or 'none'}): not a "
                         "stata-deploy model graph")
    tt = inputs["x"].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    want = [cfg.T, "batch", cfg.in_channels, cfg.img_size, cfg.img_size]
    if len(dims) != 5 or any(isinstance(g, int) and g != w for g, w in zip(dims, want) if isinstance(w, int)):
        shown = "(" + ", ".join(str(d) for d in dims) + ")"
        raise StataError(f"{path}: its description says T={cfg.T}, {cfg.in_channels}x{cfg.img_size}x{cfg.img_size} "
                         f"images, but the graph's input 'x' has shape {shown} (expected (T={cfg.T}, batch, "
                         f"{cfg.in_channels}, {cfg.img_size}, {cfg.img_size})): the file was edited or damaged")
    return cfg


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    accepts = ("threads", "precision")

    def __init__(self, path, threads: int | None = None, optimization: str = "all", precision: str | None = None,
                 **options):
        super().__init__(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the onnxruntime runtime needs onnxruntime: pip install 'stata-deploy[onnx]'") from None
        if precision not in (None, "float"):
            raise ConfigError(f"the onnxruntime runtime runs float32 only (got --precision {precision})")
        desc, proto = read_description(self.path)
        self.description = desc
        self.cfg = check_description(desc, proto, self.path)
        check_finite_tensors(proto, self.path)
        self.masks = TokenMasks.from_json(desc["masks"]) if desc.get("masks") else None
        if self.masks is not None:
            self.masks.check_model(self.cfg)
            self._check_mask_initializers(proto)
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        so.log_severity_level = 3
        # The graph is one chain of small ops (T unrolled): sequential execution, parallelism inside the kernels.
        # intra-op threads: --threads, else ONNX Runtime's default (one per physical core).
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise StataError(f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        names = [o.name for o in self.session.get_outputs()]
        self.spike_names = [n for n in desc.get("spike_outputs", []) if n in names]
        self.kept_names = [n for n in names if n.startswith("kept.")]
        if "logits_t" not in names:
            raise StataError(f"{self.path} has no 'logits_t' output: not a stata-deploy model graph")

    def _check_mask_initializers(self, proto) -> None:
        from onnx import numpy_helper

        inits = {t.name: t for t in proto.graph.initializer if t.name.startswith(MASK_PREFIX)}
        for s, m in self.masks.sites.items():
            t = inits.get(f"{MASK_PREFIX}{s}")
            if t is None:
                raise StataError(f"{self.path}: the description lists masks for site {s} but the graph has no "
                                 f"'{MASK_PREFIX}{s}' initializer")
            if not np.array_equal(numpy_helper.to_array(t).astype(bool), m):
                raise StataError(f"{self.path}: mask initializer of site {s} does not match the description")
        # The graph computes from constant indices derived from the masks at export (no node reads the masks):
        # a file whose masks were edited afterwards would silently run the old network, so refuse it.
        from stata_deploy.pruning.masks import static_plan

        idx = {t.name: t for t in proto.graph.initializer if t.name.startswith(GATHER_PREFIX)}
        for s, sp in static_plan(self.masks).sites.items():
            want = {f"{GATHER_PREFIX}{s}": sp.local[0]} if not sp.gather_tw else {
                f"{GATHER_PREFIX}{s}_t{t}": sp.local[t] for t in range(sp.T)}
            for name, v in want.items():
                if name in idx and not np.array_equal(numpy_helper.to_array(idx[name]), v):
                    raise StataError(f"{self.path}: the graph's token indices of site {s} ({name}) were not derived "
                                     "from its masks (edited after export?): export the model again")

    # ------------------------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) images -> (T, B, C, H, W) by repetition; (T, B, C, H, W) is checked and passed through."""
        cfg = self.cfg
        x = np.asarray(x, dtype=np.float32)
        want = (cfg.in_channels, cfg.img_size, cfg.img_size)
        if x.ndim == 3:
            x = x[None]
        if x.ndim not in (4, 5) or tuple(x.shape[-3:]) != want:
            raise StataError(f"input of shape {tuple(x.shape)}: the model expects images (B, {want[0]}, {want[1]}, "
                             f"{want[2]}) or sequences (T={cfg.T}, B, {want[0]}, {want[1]}, {want[2]})")
        if x.ndim == 5 and x.shape[0] != cfg.T:
            raise StataError(f"input has {x.shape[0]} timesteps, the model expects T={cfg.T}")
        if x.ndim == 4:
            x = np.broadcast_to(x[None], (cfg.T, *x.shape))
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray, record: bool = True) -> RunResult:
        xe = self.encode(x)
        wanted = ["logits_t", *(self.spike_names if record else []), *self.kept_names]
        t0 = time.perf_counter()
        outs = self.session.run(wanted, {"x": xe})
        dt = time.perf_counter() - t0
        got = dict(zip(wanted, outs))
        spikes = {n: got[n] for n in self.spike_names} if record else {}
        B = xe.shape[1]
        if self.kept_names:
            kept = {int(n.split(".", 1)[1]): got[n] for n in self.kept_names}
        elif self.masks is not None:
            kept = {s: np.broadcast_to(np.stack([np.flatnonzero(r) for r in m])[:, None], (m.shape[0], B, int(m[0].sum()))).copy()
                    for s, m in sorted(self.masks.sites.items())}
        else:
            kept = {}
        return RunResult(got["logits_t"], spikes, xe if record else None, dt, kept)

    def close(self) -> None:
        self.session = None
