"""benchmarks/ablation.py's table and verdicts on hand-made records (no training): the paired differences and their
95 % intervals, a verdict per claim that can come out supported / contradicted / cannot tell, records of another
recipe kept out, the Markdown table the README carries."""
import importlib.util
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def abl():
    spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "benchmarks" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    a = dict(dataset="fashion-mnist", model="spikformer-small", epochs=3, train_limit=None, batch_size=64, lr=3e-3,
             warmup_epochs=0, tp_limit=None, gamma_list=[0.5])
    a.update(kw)
    return SimpleNamespace(**a)


# accuracy per seed (0, 1, 2); anchor beats random by 1.0 / 1.2 / 0.8 pt, stata loses to anchor by 2.0 / 1.9 / 2.1,
# +intra is +0.5 / -0.6 / +0.2 against stata (an interval around 0)
ACC = {"none": [0.870, 0.868, 0.872], "random": [0.850, 0.852, 0.848], "anchor": [0.860, 0.864, 0.856],
       "stata": [0.840, 0.845, 0.835], "stata+intra": [0.845, 0.839, 0.837]}


def _records(abl, a, acc=ACC, epochs=None):
    b = _args(epochs=epochs or a.epochs)
    out = []
    for var, accs in acc.items():
        g = None if var == "none" else 0.5
        rec = abl.recipe(b, var, g)
        for seed, x in enumerate(accs):
            out.append({"variant": var, "gamma": g, "seed": seed, "recipe": rec, "recipe_id": abl.recipe_id(rec),
                        "test_accuracy": x, "train_seconds": 600.0, "wall_seconds": 660.0, "commit": "c",
                        "threads": 1, "finished": "2026-12-02T00:00:00Z"})
    return out


def test_paired_difference_and_interval_by_hand(abl):
    d = [1.0, 1.2, 0.8]  # points
    half = abl._t975(2) * statistics.stdev(d) / math.sqrt(3)
    m, h, n = abl.paired({0: 0.860, 1: 0.864, 2: 0.856, 5: 0.9}, {0: 0.850, 1: 0.852, 2: 0.848})
    assert n == 3 and m == pytest.approx(1.0) and h == pytest.approx(half)
    assert abl._t975(2) == pytest.approx(4.3027, abs=1e-4)  # Student's t, 2 degrees of freedom
    assert abl.paired({0: 0.9}, {0: 0.8}) is None  # one paired seed: no interval


def test_verdicts_supported_contradicted_cannot_tell(abl):
    a = _args()
    v = {line.split(":")[1].strip(): line for line in abl.verdicts(a, _records(abl, a))}
    assert "supported (+1.00 ±" in v["AT (anchor) > random"]
    assert "contradicted (-1.00 ±" in v["TAT (stata) > random"]
    assert "contradicted (-2.00 ±" in v["TAT (stata) > AT (anchor)"]
    assert "cannot tell (+0.03 ±" in v["+intra helps"] and "contains 0" in v["+intra helps"]
    assert "fewer than 2 paired seeds" in v["+inter helps"]


def test_table_keeps_other_recipes_out_and_writes_markdown(abl, tmp_path, capsys):
    a = _args()
    other = _records(abl, a, {"anchor": [0.1, 0.1, 0.1]}, epochs=1)  # another recipe: must not enter the table
    text, kv = abl.table(a, _records(abl, a) + other)
    assert kv["acc_anchor_g0.5"] == 86.0 and kv["acc_none"] == 87.0
    rows = {r[0]: r for r in abl.table_rows(a, _records(abl, a) + other)[0]}
    assert rows["anchor"][2] == 3 and rows["anchor"][4].startswith("+1.00 ± ") and rows["anchor"][5] == ""
    md, _ = abl.table(a, _records(abl, a), markdown=True)
    assert md.splitlines()[0].startswith("| variant | gamma | n |")
    assert "| anchor | 0.5 | 3 | 86.00 ± 0.40 | +1.00 ± " in md and md.rstrip().endswith("|")
    assert "| none (unpruned) | - | 3 | 87.00 ± 0.20 |  |  | 79.98 |" in md
    # the command: --table-only reads the results file, prints table and verdicts, last line key=value
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": abl.FORMAT, "runs": _records(abl, a) + other}))
    assert abl.main(["--table-only", "--markdown", "--gammas", "0.5", "--results", str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("runs=15 acc_none=87.0 ") and any(line.startswith("| stata | 0.5 | 3 |") for line in out)
    assert any("15 runs recorded" in line and "(11.0 min per run)" in line for line in out)


def test_plot_draws_one_series_per_scorer_with_its_seed_count(abl, tmp_path, monkeypatch):
    import matplotlib.axes
    from PIL import Image

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append((list(x), list(y), kw)) or real(self, x, y, **kw))
    a = _args(gamma_list=[0.3, 0.5])
    rec = abl.recipe(a, "random", 0.3)
    runs = _records(abl, a) + [r | {"gamma": 0.3, "recipe": rec, "recipe_id": abl.recipe_id(rec)}
                               for r in _records(abl, a) if r["variant"] == "random"][:2]
    out = tmp_path / "abl.png"
    abl.plot(a, runs, str(out))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200
    labels = {kw["label"]: (x, y) for x, y, kw in drawn}
    assert set(labels) == {"random (n=2-3)", "anchor (n=3)", "stata (n=3)", "stata+intra (n=3)"}
    x, y = labels["random (n=2-3)"]
    assert len(x) == 2 and x[0] < 0.3 + 0.05 < 0.5 - 0.05 < x[1]  # one point per gamma, offset beside it
    assert y[1] == pytest.approx(100 * statistics.mean(ACC["random"]))
    assert y[0] == pytest.approx(100 * statistics.mean(ACC["random"][:2]))
