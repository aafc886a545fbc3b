"""The IR (stata_deploy/ir): nodes validate with named errors, build_ir mirrors the model (names, shapes, weights),
passes return new graphs and leave their input unchanged, with exact node counts before and after (qonnx style)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stata_deploy.nn.attention import ATTENTIONS, SSA
from stata_deploy.config import PruneConfig, make_config
from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.inference import neuron_layers, run_torch
from stata_deploy.ir import build_ir, structure_ir
from stata_deploy.ir.nodes import Add, Conv, Graph, Input, IRError, Neuron, Product, Select, TokenLinear
from stata_deploy.ir.passes import ApplyMasks, DropNeverKept, FoldBatchNorm
from stata_deploy.nn.model import build_model
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.testing import liven_batchnorm, random_timestep_masks


def _model(attention="ssa", depth=2, **kw):
    torch.manual_seed(0)
    return liven_batchnorm(build_model(make_config("spikformer-tiny", attention=attention, depth=depth, **kw)).eval())


# ------------------------------------------------------------------------------------------------ nodes
BAD_NODES = [
    (lambda: Conv(name="c", in_channels=2, out_channels=3, kernel=3, stride=1, padding=1,
                  weight=np.zeros((3, 2, 1, 1))), "weight has shape"),
    (lambda: Conv(name="c", in_channels=0, out_channels=3, kernel=3, stride=1, padding=1), "in_channels must be"),
    (lambda: TokenLinear(name="l", in_features=4, out_features=2, bias=np.zeros(3)), "bias has shape"),
    (lambda: Neuron(name="n", kind="izhikevich"), "kind must be one of"),
    (lambda: Neuron(name="n", kind="lif", tau=0.5, v_th=1.0, v_reset=0.0), "tau must be"),
    (lambda: Product(name="p", kind="outer"), "kind must be one of"),
    (lambda: Select(name="s", site=1, mode="keep", method="stata", keep=0.5), "mode must be"),
    (lambda: Select(name="s", site=1, mode="drop", method="stata", keep=1.5), r"keep in \(0, 1\]"),
    (lambda: Select(name="s", site=1, mode="drop", method="static", schedule=np.array([[1, 1, 0], [1, 0, 0]], bool),
                    timestep_wise=True), "same non-zero number"),
    (lambda: Select(name="s", site=1, mode="drop", method="static", n_fixed=1, timestep_wise=False,
                    schedule=np.array([[0, 1, 1]], bool)), "drops a fixed"),
    (lambda: Input(name="", channels=1, height=8, width=8, T=4), "needs a name"),
]


@pytest.mark.parametrize("make,match", BAD_NODES, ids=[m for _, m in BAD_NODES])
def test_nodes_validate_with_a_named_error(make, match):
    with pytest.raises(IRError, match=match) as e:
        make()
    assert isinstance(e.value, StataError)


def test_graph_checks_its_wiring():
    inp = Input(name="input", channels=2, height=4, width=4, T=2)
    conv = Conv(name="c", in_channels=2, out_channels=3, kernel=3, stride=1, padding=1)
    with pytest.raises(IRError, match="cannot add shapes"):
        Graph((inp, conv, Add(name="a")), {"input": (), "c": ("input",), "a": ("input", "c")}, ())
    with pytest.raises(IRError, match="not an earlier node"):
        Graph((inp, conv), {"input": (), "c": ("d",)}, ())
    with pytest.raises(IRError, match="input has 2 channels, the conv expects 1"):
        Graph((inp, Conv(name="c", in_channels=1, out_channels=3, kernel=3, stride=1, padding=1)),
              {"input": (), "c": ("input",)}, ())
    g = Graph((inp, conv), {"input": (), "c": ("input",)}, ())
    assert g.shapes == {"input": (2, 4, 4), "c": (3, 4, 4)}


def test_nodes_are_immutable():
    node = TokenLinear(name="l", in_features=2, out_features=2, weight=np.eye(2, dtype=np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.in_features = 3
    with pytest.raises(ValueError):
        node.weight[0, 0] = 5.0  # read-only copy
    w = np.eye(2)
    n2 = TokenLinear(name="l", in_features=2, out_features=2, weight=w)
    w[0, 0] = 7.0  # the node owns a copy
    assert n2.weight[0, 0] == 1.0


# ------------------------------------------------------------------------------------------------ build
@pytest.mark.parametrize("prune", [dict(method="none"), dict(method="stata", keep=0.5), dict(method="tp", keep=0.5)],
                         ids=lambda p: p["method"])
@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_build_mirrors_the_model(attention, prune):
    model = _model(attention, depth=3, prune=PruneConfig(**prune))
    g = build_ir(model)
    modules = dict(model.named_modules())
    neurons = [n.name for n in g if isinstance(n, Neuron)]
    assert neurons == neuron_layers(model)  # same layers, forward order: the RunResult.spikes keys
    for n in g:
        if isinstance(n, (Conv, TokenLinear)):
            inner = modules[n.name].conv if isinstance(n, Conv) else modules[n.name].linear
            assert np.array_equal(n.weight, inner.weight.detach().numpy()), n.name
        elif isinstance(n, Product):
            assert n.name in modules, n.name  # the MatMul / Hadamard / TokenSum submodule
    # every neuron's shape is what a run records (rows = tokens present after pruning)
    res = run_torch(model, torch.rand(2, 1, 8, 8))
    for name in neurons:
        assert res.spikes[name].shape[2:] == g.shapes[name], name
    assert g.shapes["head"] == (10,)
    if prune["method"] == "stata":
        assert g.op_counts()["Select"] == g.op_counts()["Scorer"] == 1
        assert g.inputs["blocks.1.scorer"] == ("blocks.0.mlp_residual", "blocks.0.attn.q_lif", "blocks.0.attn.k_lif")
        assert g.schedules["blocks.2.mlp.fc1_lif"] == "blocks.1.select" and g.schedules["blocks.0.attn.q_lif"] is None
    if prune["method"] == "tp":  # every block from the first site selects; the unselected tokens rejoin after it
        assert g.op_counts()["Rejoin"] == 2
        assert g.inputs["blocks.2.rejoin"] == ("blocks.1.rejoin", "blocks.2.mlp_residual")


def test_unknown_module_is_an_error_naming_it():
    class MySSA(SSA):
        pass

    model = _model()
    model.blocks[1].attn.__class__ = MySSA
    with pytest.raises(UnsupportedOpError, match="MySSA.*blocks.1.attn.*LOWERINGS"):
        build_ir(model)


def test_structure_ir_is_the_weightless_build_and_cached():
    model = _model("sdsa", prune=PruneConfig(method="l1", keep=0.5))
    g = structure_ir(model.cfg)
    assert g == build_ir(model, weights=False) and g != build_ir(model)
    assert structure_ir(model.cfg) is g
    assert all(getattr(n, "weight", None) is None for n in g)


# ----------------------------------------------------------------------------------------------- passes
def test_fold_batchnorm_new_graph_exact_counts_and_numbers():
    model = _model("ssa", depth=2)
    g = build_ir(model)
    before = copy.deepcopy(g)
    f = g.transform(FoldBatchNorm())
    assert g == before and f is not g  # the input graph is unchanged
    c0, c1 = g.op_counts(), f.op_counts()
    assert c0["BatchNorm"] == 5 + 2 * 6 and "BatchNorm" not in c1  # 5 stem convs, 6 LinearBN per block
    assert len(f) == len(g) - 17 and {k: v for k, v in c0.items() if k != "BatchNorm"} == c1
    assert f.inputs["blocks.0.attn.q_lif"] == ("blocks.0.attn.q",) and f.shapes == {
        k: v for k, v in g.shapes.items() if not k.endswith(".bn")}
    # the folded layers compute what Linear/Conv + BatchNorm (eval) compute, bias included
    lbn = model.blocks[0].attn.q
    x = torch.randn(3, lbn.linear.in_features)
    q = f.node("blocks.0.attn.q")
    want = lbn(x.reshape(1, 1, 3, -1)).reshape(3, -1).detach().double()
    assert q.bias is not None and torch.allclose(x.double() @ torch.tensor(q.weight).T + torch.tensor(q.bias),
                                                 want, atol=1e-5)
    cbn = model.stem.stages[1].conv
    xc = torch.randn(1, cbn.conv.in_channels, 8, 8)
    c = f.node("stem.stages.1.conv")
    got = F.conv2d(xc.double(), torch.tensor(c.weight), torch.tensor(c.bias), padding=c.padding)
    assert torch.allclose(got, cbn(xc.unsqueeze(0))[0].detach().double(), atol=1e-4)
    assert f.transform(FoldBatchNorm()) == f  # nothing left to fold


def test_apply_masks_on_an_unpruned_model():
    model = _model("ssa", depth=3, anchor=True)
    masks = random_timestep_masks(model.cfg, 1, 0.5, 0)
    g = build_ir(model)
    before = copy.deepcopy(g)
    m = g.transform(ApplyMasks(masks))
    assert g == before
    assert "Select" not in g.op_counts() and m.op_counts()["Select"] == 1 and len(m) == len(g) + 1
    sel = m.node("blocks.1.select")
    assert sel.static and sel.timestep_wise and np.array_equal(sel.schedule, masks.sites[1]) and sel.keep is None
    assert m.inputs["blocks.1.select"] == ("blocks.0.mlp_residual",)
    assert sorted(m.readers("blocks.1.select")) == ["blocks.1.attn.k", "blocks.1.attn.q", "blocks.1.attn.v",
                                                     "blocks.1.attn_residual"]
    k = masks.kept(1)
    assert m.shapes["blocks.2.mlp.fc1_lif"] == (k, 4 * model.cfg.dim) and m.shapes["blocks.0.mlp.fc1_lif"][0] == 65
    assert np.array_equal(sel.positions, np.stack([np.flatnonzero(r) for r in masks.sites[1]]))
    assert m.transform(ApplyMasks(masks)) == m  # applying the same masks again changes nothing
    res = run_torch(model, torch.rand(2, 1, 8, 8), masks)
    assert all(res.spikes[n.name].shape[2:] == m.shapes[n.name] for n in m if isinstance(n, Neuron))


def test_apply_masks_replaces_dynamic_pruning():
    T, n = 4, 65
    model = _model("sdsa", depth=5, prune=PruneConfig(method="stata", keep=0.5))
    stata = build_ir(model)  # sites 1 and 4
    assert (stata.op_counts()["Scorer"], stata.op_counts()["Select"]) == (2, 2)
    masks = random_timestep_masks(model.cfg, 2, 0.25, 1)
    m = stata.transform(ApplyMasks(masks))
    c = m.op_counts()
    assert "Scorer" not in c and c["Select"] == 1 and len(m) == len(stata) - 3 and m.node("blocks.2.select").static
    # TP: a Select (and Rejoin) before/after every block from 1; static skip masks at blocks 1 and 3 only
    tp = build_ir(_model("ssa", depth=5, anchor=True, prune=PruneConfig(method="tp", keep=0.5)))
    assert {k: tp.op_counts()[k] for k in ("Scorer", "Select", "Rejoin")} == {"Scorer": 4, "Select": 4, "Rejoin": 4}
    keep = np.zeros((T, n), bool)
    keep[:, :33] = True
    skip = TokenMasks({1: keep, 3: keep[:, ::-1] | (np.arange(n) == 0)}, n, T, "skip")
    before = copy.deepcopy(tp)
    m = tp.transform(ApplyMasks(skip))
    assert tp == before
    c = m.op_counts()
    assert "Scorer" not in c and (c["Select"], c["Rejoin"]) == (2, 2) and len(m) == len(tp) - 8
    assert m.inputs["blocks.3.rejoin"] == ("blocks.2.mlp_residual", "blocks.3.mlp_residual")
    assert m.inputs["blocks.1.select"] == ("blocks.0.mlp_residual",) and m.inputs["head"] == ("blocks.4.mlp_residual",)
    assert m.inputs["blocks.2.attn.q"] == ("blocks.1.rejoin",) and m.shapes["blocks.1.rejoin"] == (n, 32)
    with pytest.raises(IRError, match="masks are for T=4, 64 tokens"):
        tp.transform(ApplyMasks(TokenMasks({1: np.ones((T, 64), bool)}, 64, T)))


def test_drop_never_kept():
    model = _model("ssa", depth=3, anchor=True)
    D = model.cfg.dim
    masks = random_timestep_masks(model.cfg, 1, 0.25, 0)  # 16 of 64 image tokens per timestep, anchor kept
    union = int(masks.sites[1].any(0).sum())
    g = build_ir(model).transform(ApplyMasks(masks))
    before = copy.deepcopy(g)
    d = g.transform(DropNeverKept())
    assert g == before and d != g
    assert d.op_counts() == g.op_counts() and d.shapes == g.shapes  # the same ops on the same rows per timestep
    assert g.population("blocks.1.select") == 65 and d.population("blocks.1.select") == union < 65
    assert np.array_equal(d.node("blocks.1.select").tokens, np.flatnonzero(masks.sites[1].any(0)))
    total = lambda gr: sum(gr.neurons(n.name) for n in gr if isinstance(n, Neuron))
    per_token = 10 * D  # q, k, v, attn, proj, fc2: D each; fc1: 4 D
    assert total(g) - total(d) == (65 - union) * per_token * 2  # blocks 1 and 2 hold fewer neurons
    assert d.neurons("blocks.2.mlp.fc1_lif") == union * 4 * D and d.neurons("blocks.0.mlp.fc1_lif") == 65 * 4 * D
    # a time-invariant schedule: only the kept tokens' neurons remain
    fixed = TokenMasks({1: np.repeat(masks.sites[1][:1], model.cfg.T, 0)}, 65, model.cfg.T)
    f = build_ir(model).transform(ApplyMasks(fixed)).transform(DropNeverKept())
    assert f.population("blocks.1.select") == fixed.kept(1) and not f.node("blocks.1.select").timestep_wise
    assert d.transform(DropNeverKept()) == d
