import json

from click.testing import CliRunner

from stata_deploy.cli.main import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_writes_contract_files(tmp_path):
    out = tmp_path / "r"
    r = run("train", "--epochs", 1, "--train-limit", 64, "--quiet", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output.strip().splitlines()[-1])
    for key in ("test_accuracy", "epochs", "train_seconds", "dataset", "model", "prune", "keep"):
        assert key in m
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert {"config.json", "model.safetensors", "metrics.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    r = run("eval", out, "--json", "--limit", 50)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["samples"] == 50


def test_bad_inputs_one_line_nonzero(tmp_path):
    cases = [
        (["train", "--dataset", "nosuch", "--out", tmp_path / "a"], "unknown dataset"),
        (["train", "--keep", "1.7", "--out", tmp_path / "b"], "(0, 1]"),
        (["eval", tmp_path / "missing"], "not found"),
    ]
    for args, msg in cases:
        r = run(*args)
        assert r.exit_code != 0
        assert msg in r.output
        assert "Traceback" not in r.output


def test_corrupted_checkpoint_and_mismatched_config(trained_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    r = run("eval", bad)
    assert r.exit_code == 2 and "not a valid safetensors" in r.output
    mism = tmp_path / "mism"
    shutil.copytree(trained_run, mism)
    cfg = json.loads((mism / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (mism / "config.json").write_text(json.dumps(cfg))
    r = run("eval", mism)
    assert r.exit_code == 2 and "do not match" in r.output


def test_prune_tp_training_free(base_run, tmp_path):
    r = run("prune", base_run, "--method", "tp", "--keep", 0.5, "--out", tmp_path / "tp", "--json", "--limit", 60)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["token_ratio"] < 1.0 and 0 <= res["test_accuracy"] <= 1


def test_calibrate_writes_masks(trained_run, tmp_path):
    out = tmp_path / "m.json"
    r = run("calibrate", trained_run, "--samples", 64, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["sites"] == {"1": 33}
    assert out.is_file()


def test_anchor_grad_refused_for_methods_without_an_anchor(tmp_path):
    for flag in ("--anchor-grad", "--no-anchor-grad"):
        r = run("train", "--prune", "l1", "--keep", "0.5", flag, "--epochs", 1, "--out", tmp_path / "a")
        assert r.exit_code == 2, r.output
        lines = [l for l in r.output.strip().splitlines() if l]
        assert len(lines) == 1 and lines[0].startswith("error:") and "anchor" in lines[0], r.output
        assert not (tmp_path / "a").exists()


def test_alignment_weights_reach_the_model_and_need_their_loss(tmp_path):
    """--intra-weight / --inter-weight: refused (one line, exit 2, nothing written) without the loss in --align or
    out of range; otherwise recorded in the run's model config, which the loss reads."""
    for args, words in ((["--intra-weight", 1], "add --align intra"), (["--align", "intra", "--inter-weight", 1],
                                                                        "add --align inter"),
                        (["--align", "intra", "--intra-weight", -1], "intra_weight must be a number in [0, 1000]")):
        r = run("train", "--prune", "stata", "--keep", "0.5", *args, "--epochs", 1, "--out", tmp_path / "a")
        lines = [l for l in r.output.strip().splitlines() if l]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.output
        assert not (tmp_path / "a").exists()
    out = tmp_path / "w"
    r = run("train", "--prune", "stata", "--keep", "0.5", "--align", "intra,inter", "--intra-weight", 2.5,
            "--epochs", 1, "--train-limit", 64, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    prune = json.loads((out / "config.json").read_text())["model"]["prune"]
    assert (prune["intra_weight"], prune["inter_weight"]) == (2.5, 0.01)
