"""ONNX exporter: a trained spiking transformer + its static per-timestep token masks -> one ``.onnx`` file.

The graph (opset 18, standard ``ai.onnx`` domain only, ``onnx.checker`` full check clean):

* input ``x``: float32 (T, B, C, H, W) — the encoded input (direct encoding repeats an image T times; the runtime
  does that). T, C, H, W are fixed, the batch B is symbolic.
* outputs: ``logits_t`` (T, B, classes), then one output per neuron layer named by its torch module path
  (``stem.stages.0.lif``, ``blocks.0.attn.q_lif``, ...; the keys of ``stata_deploy.inference.run_torch``), in the
  slot layout of the torch model (pruned tokens absent), so a runtime returns the same ``RunResult`` and spikes can be
  compared number for number. Dynamic-mask exports add ``kept.<site>`` (T, B, k) int64 kept token positions.
* T is unrolled. LIF state is explicit inside the graph: a token not kept at timestep t receives no input and its
  membrane decays by ``(1 - 1/tau)`` per skipped step (the contract in ``stata_deploy/neurons.py``), so a dropped
  token never spikes. Static masks are compiled at export (``stata_deploy.pruning.masks.static_plan``): the kept slots are
  gathered with constant int64 indices (initializers ``stata_gather_site<i>[_t<t>]``), and where the kept tokens
  differ between timesteps each neuron starts a step from constant-index gathers of the membranes its tokens had
  when last kept (``neurons.LIFSchedule``): no TopK/CumSum/Scatter, no full-N membrane buffer, nothing computed for
  a token never kept. A time-invariant schedule is plain LIF over the kept slots.
* static masks are also stored as initializers named ``stata_mask_site<i>``: bool (T, n_full), exactly
  ``TokenMasks.sites[i]`` (no node reads them; a reader takes the masks from them, and the exporter checks that the
  index initializers it wrote are the ones derived from them).
* weights are inline; when the initializers exceed ``EXTERNAL_DATA_BYTES`` (or ``external_data=True``) they go to
  ``<file>.data`` beside the model (ONNX external data, one file).

The description every stata-deploy file carries (``stata_deploy.description``): the model's ``metadata_props`` hold
key ``"stata_deploy"`` with the common JSON object (format, version, weights_sha256, config, T, masks, mask_source,
encoding) plus ``mask_initializers``, ``pruning``, ``input``, ``outputs``, ``spike_outputs`` and ``neuron``. It names
no path: ``stata-deploy run FILE --compare torch`` takes the run folder from ``--run`` or the file's own folder.

A failed export leaves no file behind: everything is written to temporary files in the target folder and renamed
into place at the end.
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stata_deploy import description
from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.exporter_api import Exporter
from stata_deploy.inference import neuron_layers
from stata_deploy.nn.neurons import NEURON_TYPES, ReLUNeuron, TokenIndex, multistep_neuron_traceable
from stata_deploy.pruning.masks import TokenMasks, static_plan

FORMAT = "stata-deploy-onnx/1"
META_KEY = description.META_KEY
OPSET = 18
MASK_PREFIX = "stata_mask_site"
GATHER_PREFIX = "stata_gather_site"
SCATTER_PREFIX = "stata_scatter_site"
EXTERNAL_DATA_BYTES = 1 << 30  # ONNX protobufs are limited to 2 GiB; go external well before


# --------------------------------------------------------------------------------------------- tracing
class _Tap(nn.Module):
    """Stands in for a neuron module while tracing: the traceable neuron, and records its output under ``name``."""

    def __init__(self, neuron: nn.Module, name: str, sink: dict):
        super().__init__()
        self.name, self.sink = name, sink
        self.relu = isinstance(neuron, ReLUNeuron)
        self.tau = getattr(neuron, "tau", None)
        self.v_th = getattr(neuron, "v_th", None)
        self.v_reset = getattr(neuron, "v_reset", None)
        self.ternary = bool(getattr(neuron, "_ternary", False))

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None) -> torch.Tensor:
        if self.relu:
            s = torch.relu(x)
        else:
            s = multistep_neuron_traceable(x, self.tau, self.v_th, self.v_reset, self.ternary, index)
        self.sink[self.name] = s
        return s


def _tapped_copy(model: nn.Module) -> tuple[nn.Module, list[str], dict]:
    """A deep copy of ``model`` whose neuron modules are replaced by taps; returns (copy, layer names, sink)."""
    m = copy.deepcopy(model).eval()
    sink: dict[str, torch.Tensor] = {}
    names = neuron_layers(m)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        neuron = getattr(parent, attr)
        if not isinstance(neuron, NEURON_TYPES):  # pragma: no cover - neuron_layers guarantees it
            raise UnsupportedOpError(f"cannot lower neuron {name} ({type(neuron).__name__})")
        setattr(parent, attr, _Tap(neuron, name, sink))
    return m, names, sink


class _StaticGraph(nn.Module):
    """The model's forward with static masks, every index a constant fixed at export.

    Mirrors ``SpikingTransformer._forward_static`` (the same ``pruning.static_plan``): drop mode gathers the kept
    slots at each site with constant int64 indices (``stata_gather_site<i>``, or ``stata_gather_site<i>_t<t>`` per
    timestep when the kept slots differ between timesteps: a Split over T, one Gather per step, a Concat), and the
    neurons after a site whose tokens differ between timesteps follow its precomputed ``LIFSchedule`` (constant
    gathers of earlier steps' membranes, no full-N buffer). Skip mode (TP): the kept tokens go through the block,
    the output is one constant-index Gather of Concat(input, block output) (``stata_scatter_site<i>``). Nothing
    is computed for a token that is never kept. The parity tests check it against the eager model spike for spike.
    """

    def __init__(self, model: nn.Module, masks: TokenMasks | None):
        super().__init__()
        self.net, self.names, self.sink = _tapped_copy(model)
        self.cfg = model.cfg
        self.plan = static_plan(masks, model.cfg) if masks is not None else None
        self.mode = masks.mode if masks is not None else "drop"
        self.index_names: dict[str, np.ndarray] = {}  # initializer name -> value (checked after export)
        if self.plan is None:
            return
        N = self.plan.n_full
        for s, sp in self.plan.sites.items():
            if sp.gather_tw:
                for t in range(sp.T):
                    self._constant(f"{GATHER_PREFIX}{s}_t{t}", sp.local[t])
            else:
                self._constant(f"{GATHER_PREFIX}{s}", sp.local[0])
            if self.mode == "skip":  # output position p reads x[p], or the block's slot j holding p (row N + j)
                perm = np.tile(np.arange(N, dtype=np.int64), (sp.T, 1))
                for t in range(sp.T):
                    perm[t, sp.local[t]] = N + np.arange(sp.k)
                if sp.gather_tw:
                    for t in range(sp.T):
                        self._constant(f"{SCATTER_PREFIX}{s}_t{t}", perm[t])
                else:
                    self._constant(f"{SCATTER_PREFIX}{s}", perm[0])

    def _constant(self, name: str, value: np.ndarray) -> None:
        self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value, dtype=np.int64)))
        self.index_names[name] = np.asarray(value, dtype=np.int64)

    def _select(self, x: torch.Tensor, sp, prefix: str) -> torch.Tensor:
        """x (T, B, n, D) -> the constant slots of ``prefix`` along the token axis, per timestep if they differ."""
        if not sp.gather_tw:
            return torch.index_select(x, 2, getattr(self, f"{prefix}{sp.site}"))
        return torch.cat([torch.index_select(xt, 2, getattr(self, f"{prefix}{sp.site}_t{t}"))
                          for t, xt in enumerate(torch.split(x, 1, 0))], 0)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``net.tokens`` in ops whose shapes ONNX shape inference can follow (``_constant_shapes``): the anchor
        rows are ones of shape (T, B, 1, 1) times the anchor (exact), not an Expand to a computed shape."""
        net = self.net
        x = net.stem(net.encode(x))  # (T, B, N, D)
        if net.anchor is None:
            return x
        ones = torch.ones_like(x[:, :, :1, :1])
        return torch.cat([ones * net.anchor, x], 2)

    def forward(self, x: torch.Tensor):
        net, cfg = self.net, self.cfg
        self.sink.clear()
        x = self._tokens(x)  # (T, B, N, D)
        N = self.plan.n_full if self.plan is not None else cfg.num_tokens
        n_fixed = 1 if cfg.anchor else 0
        index: TokenIndex | None = None
        sites = self.plan.sites if self.plan is not None else {}
        for i, blk in enumerate(net.blocks):
            sp = sites.get(i)
            if sp is not None:
                pos = torch.as_tensor(sp.positions).unsqueeze(1)  # (T, 1, k): descriptive, no graph op uses it
                if self.mode == "skip":
                    y, _ = blk(self._select(x, sp, GATHER_PREFIX), TokenIndex(pos, N, False))
                    x = self._select(torch.cat([x, y], 2), sp, SCATTER_PREFIX)
                    continue
                x = self._select(x, sp, GATHER_PREFIX)
                index = TokenIndex(pos, N, sp.tw, sp.schedule)
            x, _ = blk(x, index)
        img = x[:, :, n_fixed:] if n_fixed else x
        logits_t = net.head(img.mean(2))  # (T, B, classes)
        return (logits_t, *[self.sink[n] for n in self.names])


class _DynamicGraph(nn.Module):
    """The model's own forward with dynamic top-k (scores, TopK, gathers all in the graph)."""

    def __init__(self, model: nn.Module, sites: list[int]):
        super().__init__()
        self.net, self.names, self.sink = _tapped_copy(model)
        self.sites = sites

    def forward(self, x: torch.Tensor):
        self.sink.clear()
        out = self.net(x)
        return (out.logits_t, *[self.sink[n] for n in self.names], *[out.kept[s] for s in self.sites])


# ----------------------------------------------------------------------------------------------- export
def _inferred_dims(proto, batch: int) -> dict[str, list[int | None]]:
    """Output dims of every node for a concrete batch size (ONNX shape inference with data propagation on a light
    copy of the graph: float initializers become typed inputs, so no weight is copied)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = []
    for i in proto.graph.input:
        dims = [batch if (d.dim_param or not d.HasField("dim_value")) else d.dim_value
                for d in i.type.tensor_type.shape.dim]
        inputs.append(helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, dims))
    small = []
    for t in proto.graph.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and np.prod(t.dims, dtype=np.int64) <= 64:
            small.append(t)
        else:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    nodes, folded = _fold_index_constants(proto, small)
    graph = helper.make_graph(nodes, "shapes", inputs, [], initializer=small + folded)
    light = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    out = {}
    for v in inferred.graph.value_info:
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return out


def _fold_index_constants(proto, small) -> tuple[list, list]:
    """(nodes, initializers): small integer Constant/Unsqueeze/Squeeze/Concat/Cast/Identity chains evaluated, so
    that shape inference sees Slice/Expand arguments as constants (it does not look through an Unsqueeze)."""
    from onnx import helper, numpy_helper

    vals = {t.name: numpy_helper.to_array(t) for t in small}
    nodes, folded = [], []

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    for node in proto.graph.node:
        v = None
        ins = [vals.get(i) for i in node.input]
        try:
            if node.op_type == "Constant" and attr(node, "value") is not None:
                a = numpy_helper.to_array(attr(node, "value"))
                v = a if a.dtype.kind in "iu" and a.size <= 64 else None
            elif ins and all(i is not None for i in ins):
                if node.op_type == "Unsqueeze":
                    v = np.expand_dims(ins[0], tuple(int(a) for a in ins[1])) if len(ins) > 1 else None
                elif node.op_type == "Squeeze" and len(ins) > 1:
                    v = np.squeeze(ins[0], tuple(int(a) for a in ins[1]))
                elif node.op_type == "Concat":
                    v = np.concatenate(ins, axis=attr(node, "axis", 0))
                elif node.op_type == "Identity":
                    v = ins[0]
                elif node.op_type == "Cast" and attr(node, "to") in (6, 7):
                    v = ins[0].astype(np.int64 if attr(node, "to") == 7 else np.int32)
        except (ValueError, IndexError, TypeError):  # pragma: no cover - leave it to shape inference
            v = None
        if v is not None and len(node.output) == 1:
            vals[node.output[0]] = v
            folded.append(numpy_helper.from_array(np.asarray(v), node.output[0]))
        else:
            nodes.append(node)
    return nodes, folded


def _constant_shapes(proto) -> int:
    """Replace computed Reshape targets by constants: the tracer turns every ``reshape(T, B, ...)`` into
    Shape/Gather/Unsqueeze/Concat arithmetic on the symbolic batch. Shapes are inferred for two batch sizes; a
    Reshape whose output dims all agree but one gets an int64 initializer target with -1 at that dim (the one
    that follows the batch), and the arithmetic is dropped (``_drop_dead_nodes``). Returns the Reshapes rewritten."""
    from onnx import numpy_helper

    try:
        a, b = _inferred_dims(proto, 2), _inferred_dims(proto, 3)
    except Exception:  # pragma: no cover - an optimisation, never a requirement
        return 0
    names = {t.name for t in proto.graph.initializer}
    done = 0
    for node in proto.graph.node:
        if node.op_type != "Reshape" or len(node.input) != 2 or node.input[1] in names:
            continue
        if any(at.name == "allowzero" and at.i for at in node.attribute):
            continue
        da, db = a.get(node.output[0]), b.get(node.output[0])
        if not da or not db or len(da) != len(db) or None in da or None in db or 0 in da:
            continue
        differ = [i for i, (p, q) in enumerate(zip(da, db)) if p != q]
        if len(differ) != 1:
            continue
        dims = list(da)
        dims[differ[0]] = -1
        name = f"{node.output[0]}_shape"
        while name in names:
            name += "_"
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(dims, dtype=np.int64), name))
        names.add(name)
        node.input[1] = name
        done += 1
    _drop_dead_nodes(proto)
    return done


def _drop_dead_nodes(proto) -> None:
    """Remove nodes none of whose outputs is used (by a node or as a graph output); initializers are kept."""
    while True:
        used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
        keep = [n for n in proto.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(proto.graph.node):
            return
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def _add_masks(proto, masks: TokenMasks, index_names: dict) -> None:
    """Store each site's mask as initializer ``stata_mask_site<i>`` (bool (T, n_full)): the graph computes from the
    constant indices derived from them at export, a reader takes the masks from here. Refuse a graph whose index
    constants were lost or changed by the exporter."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    # the dynamo exporter renames them or inlines them as Constant nodes: then look for the values
    consts = [numpy_helper.to_array(a.t) for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value" and a.t.data_type == onnx.TensorProto.INT64]
    consts += [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT64]

    def present(name, v):
        if name in inits:
            return np.array_equal(numpy_helper.to_array(inits[name]), v)
        return any(c.shape == v.shape and np.array_equal(c, v) for c in consts)

    bad = [n for n, v in index_names.items() if not present(n, v)]
    if bad:
        raise UnsupportedOpError(f"token index constants were lost while exporting: {', '.join(bad)}")
    for s in sorted(masks.sites):
        name = f"{MASK_PREFIX}{s}"
        t = numpy_helper.from_array(np.asarray(masks.sites[s], dtype=bool), name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            proto.graph.initializer.append(t)


def _initializer_bytes(proto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in proto.graph.initializer)


def _check_standard(proto) -> None:
    bad = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if bad or len(proto.functions):
        raise UnsupportedOpError(f"the ONNX graph uses non-standard domains or functions: {bad or 'functions'}")


class OnnxExporter(Exporter):
    name = "onnx"
    suffix = ".onnx"

    def export(self, model, masks: TokenMasks | None, out: Path, dynamic_masks: bool = False,
               external_data: bool | None = None, opset: int = OPSET,
               weights_sha256: str | None = None, dynamo: bool = False, **options) -> dict:
        """Export ``model`` with static ``masks`` (or, with ``dynamic_masks=True`` and no masks, dynamic top-k).

        ``dynamo=True`` uses torch's torch.export-based exporter (needs onnxscript) instead of the TorchScript
        tracer (the default; see benchmarks/onnx_latency.py --dynamo for the comparison)."""
        import onnx

        out = Path(out)
        cfg = model.cfg
        model.eval()
        if opset < 17:
            raise StataError(f"opset {opset} is too old: use 17 or newer")
        pruned = cfg.prune.active
        if masks is not None:
            masks.check_model(cfg)
            if dynamic_masks:
                raise StataError("static masks were given together with dynamic masks: choose one")
        elif pruned and not dynamic_masks:
            raise StataError(
                f"the model is pruned ({cfg.prune.method}, keep {cfg.prune.keep}) but no static masks were given: run "
                "`stata-deploy calibrate RUN` first, or export with --masks dynamic")
        notes = []
        if masks is not None:
            source = "static"
            graph = _StaticGraph(model, masks)
            extra_outputs: list[str] = []
        elif pruned:
            if cfg.prune.method == "random":
                raise UnsupportedOpError("dynamic 'random' token selection has no deterministic ONNX lowering; "
                                         "calibrate static masks instead")
            source = "dynamic"
            with torch.no_grad():
                probe = model(torch.zeros(cfg.T, 1, cfg.in_channels, cfg.img_size, cfg.img_size))
            sites = sorted(probe.kept)
            graph = _DynamicGraph(model, sites)
            extra_outputs = [f"kept.{s}" for s in sites]
            if cfg.prune.method == "tp":  # equal scores go to the lower index in both (scorers.top_indices)
                notes.append("dynamic TP top-k in the graph: TP's real-valued scores are computed with a different "
                             "float32 rounding by ONNX Runtime; two scores within one ulp at the k-th place can "
                             "swap (measured: 4 of 360 digits test images on a trained spikformer-tiny)")
        else:
            source = "none"
            graph = _StaticGraph(model, None)
            extra_outputs = []
        output_names = ["logits_t", *graph.names, *extra_outputs]
        example = torch.zeros(cfg.T, 2, cfg.in_channels, cfg.img_size, cfg.img_size)
        desc = description.describe(
            FORMAT, cfg, masks, weights_sha256=weights_sha256, mask_source=source,
            mask_initializers={str(s): f"{MASK_PREFIX}{s}" for s in sorted(masks.sites)} if masks else {},
            pruning={"method": cfg.prune.method, "keep": cfg.prune.keep, "sites": cfg.prune.resolved_sites(cfg.depth)
                     if cfg.prune.active else [], "mode": masks.mode if masks is not None else None},
            input={"name": "x", "shape": ["T", "B", cfg.in_channels, cfg.img_size, cfg.img_size]},
            outputs=output_names,
            spike_outputs=graph.names,
            neuron={"model": "LIF (SpikingJelly form), hard reset; dropped tokens get no input and decay",
                    "tau": 2.0, "v_reset": 0.0})
        try:
            with torch.no_grad(), _quiet():
                if dynamo:
                    program = torch.onnx.export(
                        graph, (example,), dynamo=True, input_names=["x"], output_names=output_names,
                        dynamic_shapes=({1: torch.export.Dim("batch", min=1)},), opset_version=opset,
                        optimize=True, verbose=False)
                    proto = program.model_proto
                else:
                    buf = io.BytesIO()
                    # The TorchScript tracer (see benchmarks/onnx_latency.py --dynamo for the dynamo exporter);
                    # with constant folding off the index buffers stay initializers.
                    torch.onnx.export(
                        graph, (example,), buf, dynamo=False, input_names=["x"], output_names=output_names,
                        dynamic_axes={n: {1: "batch"} for n in ["x", *output_names]}, opset_version=opset,
                        do_constant_folding=False, export_params=True,
                    )
                    proto = onnx.load_from_string(buf.getvalue())
        except StataError:
            raise
        except Exception as e:  # the tracer's errors are long; keep the first line
            raise UnsupportedOpError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from e
        _check_standard(proto)
        _constant_shapes(proto)
        # unused opset imports of the exporter's private domains would make readers look for them
        used = {n.domain for n in proto.graph.node}
        keep = [o for o in proto.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        if masks is not None:
            _add_masks(proto, masks, graph.index_names)
        proto.producer_name = "stata-deploy"
        proto.producer_version = desc["version"]
        proto.doc_string = f"stata-deploy {cfg.name}: spiking transformer, T={cfg.T}, masks {source}"
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, description.encode(desc)
        big = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
        data_path = out.with_name(out.name + ".data") if big else None
        _write_atomic(proto, out, data_path)
        return {
            "path": str(out),
            "format": "onnx",
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "bytes": out.stat().st_size + (data_path.stat().st_size if data_path else 0),
            "external_data": str(data_path) if data_path else None,
            "masks": source,
            "spike_outputs": len(graph.names),
            "notes": notes,
        }


class _quiet:
    """Silence the exporter's progress prints (it writes to stdout) so --json output stays one object."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._stack.close()


def _checked(check) -> None:
    import onnx

    try:
        check()
    except onnx.checker.ValidationError as e:
        raise UnsupportedOpError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from e


def _write_atomic(proto, out: Path, data_path: Path | None) -> None:
    """Check the model and write it atomically (stata_deploy.fileio): in memory, then one write; a model with
    external data is saved to temp files beside ``out`` and both are renamed only when both are complete."""
    import onnx

    from stata_deploy.fileio import atomic_write_bytes, check_output, ensure_folder

    if data_path is None:
        _checked(lambda: onnx.checker.check_model(proto, full_check=True))
        atomic_write_bytes(out, proto.SerializeToString())
        return
    check_output(out)
    check_output(data_path)
    ensure_folder(out.parent)
    tmpdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tmp = tmpdir / out.name
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        _checked(lambda: onnx.checker.check_model(str(tmp), full_check=True))
        os.replace(tmpdir / data_path.name, data_path)
        try:
            os.replace(tmp, out)
        except OSError:
            data_path.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise StataError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        for p in tmpdir.glob("*"):
            p.unlink()
        tmpdir.rmdir()
