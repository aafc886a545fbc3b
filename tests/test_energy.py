"""Hardware profiles, energy arithmetic, and the `energy` CLI contract (DESIGN.md section 1)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stata_deploy.cli.main import main
from stata_deploy.energy.profiles import ProfileError, builtin_profiles, estimate_energy, load_profile
from stata_deploy.energy.counter import OP_KINDS, LayerOps, OpsReport


def _report(**counts):
    """A one-layer report with the given per-inference counts (T=1)."""
    lo = LayerOps("blocks.0.attn.q", "linear", "blocks.0.attn.q_lif", 8,
                  {k: np.array([float(v)]) for k, v in counts.items()})
    return OpsReport([lo], 1, 1)


def test_builtin_profiles_have_citations_and_paper_numbers():
    assert set(builtin_profiles()) >= {"45nm", "loihi", "spinnaker2", "truenorth"}
    for name in builtin_profiles():
        p = load_profile(name)
        assert p.citation and all(c.source for c in p.ops.values()), name
        assert set(p.ops) <= set(OP_KINDS)
    h = load_profile("45nm")
    assert (h.ops["mac"].pj, h.ops["ac"].pj) == (4.6, 0.9)
    lo = load_profile("loihi")
    assert (lo.ops["ac"].pj, lo.ops["neuron_update"].pj, lo.ops["idle_neuron_update"].pj, lo.ops["spike"].pj) == \
        (23.6, 81.0, 52.0, 1.7)
    assert load_profile("spinnaker2").ops["ac"].pj == 10.0 and load_profile("truenorth").ops["ac"].pj == 2.5


def test_energy_arithmetic_exact():
    rep = _report(macs=1000, acs=20000, attention_acs=300, neuron_updates=512, spikes=40)
    e = estimate_energy(rep, load_profile("45nm"))
    assert e.total_mj == pytest.approx((1000 * 4.6 + 20300 * 0.9) * 1e-9, rel=1e-12)
    assert e.layers[0]["energy_mj"] == pytest.approx(e.total_mj)
    assert set(e.not_costed) == {"neuron_update", "spike"}  # explicit zeros are reported, not hidden
    e = estimate_energy(rep, load_profile("loihi"))
    assert e.total_mj == pytest.approx((1000 * 4.6 + 20300 * 23.6 + 512 * 81 + 40 * 1.7) * 1e-9, rel=1e-12)
    assert e.not_costed == {}


def test_missing_cost_is_an_error_naming_the_op(tmp_path):
    with pytest.raises(ProfileError, match="'attention_mac'"):
        estimate_energy(_report(acs=10, attention_macs=5), load_profile("loihi"))
    f = tmp_path / "chip.toml"
    f.write_text('name = "chip"\ncitation = "test"\n[ops]\nac = 1.5\nmac = { pj = 3.0, source = "made up for a test" }\n')
    p = load_profile(str(f))
    assert p.name == "chip" and p.ops["mac"].pj == 3.0 and p.ops["mac"].source
    assert estimate_energy(_report(acs=10, macs=2), p).total_mj == pytest.approx(21e-9)
    with pytest.raises(ProfileError, match="'neuron_update'"):
        estimate_energy(_report(acs=10, neuron_updates=3), p)
    bad = tmp_path / "bad.json"
    for text, msg in [('{"ops": {"ac": -1}}', "non-negative"), ('{"ops": {"flop": 1}}', "unknown op"),
                      ('{"name": "x"}', "no [ops]"), ("{nope", "not valid JSON")]:
        bad.write_text(text)
        with pytest.raises(ProfileError, match=msg.replace("[", r"\[")):
            load_profile(str(bad))
    with pytest.raises(ProfileError, match="unknown hardware"):
        load_profile("loihi3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An unpruned and a STATA-pruned tiny model (same weights, untrained, livelier BN) saved as run folders."""
    from stata_deploy.train.checkpoint import save_model
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model

    root = tmp_path_factory.mktemp("energy")
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=2, T=2)
    base = build_model(cfg)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.mul_(2.0)
                m.bias.uniform_(0.0, 2.5)
    save_model(root / "base", base, {"train": {"dataset": "digits"}})
    pm = build_model(cfg.replace(prune={"method": "stata", "keep": 0.25}))
    pm.load_state_dict(base.state_dict(), strict=False)
    save_model(root / "stata", pm, {"train": {"dataset": "digits"}})
    return root


def test_cli_energy_json_contract_with_baseline_and_plot(runs, tmp_path):
    plot = tmp_path / "e.png"
    r = CliRunner().invoke(main, ["energy", str(runs / "stata"), "--hardware", "loihi", "--baseline", str(runs / "base"),
                                  "--limit", "12", "--json", "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    for key in ("energy_mj", "macs", "acs", "attention_ops", "layers", "ops_ratio", "energy_ratio"):
        assert key in res
    assert isinstance(res["layers"], list) and {"name", "macs", "acs", "attention_ops", "spikes", "firing_rate",
                                                "energy_mj"} <= set(res["layers"][0])
    assert res["energy_mj"] == pytest.approx(sum(l["energy_mj"] for l in res["layers"]))
    assert any(l["kind"] == "scorer" for l in res["layers"])  # the scorer's cost is its own layer
    assert 0 < res["ops_ratio"] < 1 and 0 < res["energy_ratio"] < 1  # keep 0.25 from block 1 on
    assert res["attention_ops"] > 0 and res["samples"] == 12
    assert plot.is_file() and plot.stat().st_size > 1000


def test_cli_energy_errors_one_line(runs, tmp_path):
    prof = tmp_path / "p.toml"
    prof.write_text("[ops]\nac = 1\nmac = 2\nattention_ac = 1\ncompare = 0\n")
    r = CliRunner().invoke(main, ["energy", str(runs / "base"), "--hardware", str(prof), "--limit", "4"])
    assert r.exit_code == 2 and "no cost for op 'neuron_update'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["energy", str(runs / "stata"), "--masks", "static", "--limit", "4"])
    assert r.exit_code == 2 and "calibrate" in r.output
    r = CliRunner().invoke(main, ["energy", str(runs / "base"), "--hardware", "nosuch"])
    assert r.exit_code == 2 and "unknown hardware" in r.output
