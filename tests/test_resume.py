"""Crash safety: SIGKILL + --resume gives bitwise the same weights; corrupted checkpoints fall back to the previous
one; loading never executes code (pickle files are refused)."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stata_deploy.train import checkpoint as ckpt
from stata_deploy.cli.main import main
from stata_deploy.errors import CheckpointError
from stata_deploy.train.loop import TrainConfig, train

# 2 epochs x 8 steps of 16 images (128 digits, 64 test images): small enough for the 2 shared cores, long enough
# to kill mid-epoch.
ARGS = ["--epochs", "2", "--batch-size", "16", "--threads", "1", "--quiet", "--checkpoint-every", "1", "--seed", "3"]
STEPS = 16


def _cli(data, out, *extra):
    return [sys.executable, "-m", "stata_deploy", "train", "--dataset", f"npz:{data}", *ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_npz(digits_npz):
    return digits_npz(128)


def _tensors(run):
    return ckpt.load_tensors(Path(run) / "model.safetensors")


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), f"{k} differs"


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"}
            for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_is_bitwise_identical(tmp_path, tiny_npz):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(2, STEPS - 3)
    print(f"\nkilling after the checkpoint of step {kill_after} of {STEPS} (seed {seed})")
    # the uninterrupted run and the run to be killed share the 2 cores, so start both at once; the one to be killed
    # blocks right after writing the checkpoint of step kill_after (stata_deploy.train.loop's test hook), so the kill
    # lands exactly there however fast the machine is
    p_ref = subprocess.Popen(_cli(tiny_npz, ref), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p = subprocess.Popen(_cli(tiny_npz, crash), env=dict(env, STATA_TEST_PAUSE_AFTER_STEP=str(kill_after)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and p.poll() is None:
        done = [s for s, _ in ckpt.list_train_checkpoints(crash)]
        if kill_after in done:
            os.kill(p.pid, signal.SIGKILL)
            killed_at = max(done)
            break
        time.sleep(0.05)
    p.wait(30)
    assert killed_at == kill_after and p.returncode == -signal.SIGKILL, (seed, killed_at, p.returncode,
                                                                          p.stderr.read())
    assert not (crash / "metrics.json").exists(), "the run finished before it was killed"
    r = subprocess.run(_cli(tiny_npz, crash, "--resume"), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert p_ref.wait(180) == 0, p_ref.stderr.read()
    _assert_bitwise_equal(_tensors(ref), _tensors(crash))
    assert _history(ref) == _history(crash)  # same data order, losses and accuracies, step for step
    assert json.loads((crash / "metrics.json").read_text())["epochs"] == 2
    print(f"killed after checkpoint step {killed_at} of {STEPS} (seed {seed}): resumed weights bitwise identical")


def _tc(out, **kw):
    return TrainConfig(dataset="digits", epochs=1, train_limit=64, batch_size=16, checkpoint_every=1, seed=5,
                       out=str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared: one thread each is faster than oversubscribing
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small(digits):
    """digits with a 64-image test split: the per-epoch evaluation stays cheap."""
    import dataclasses

    return dataclasses.replace(digits, x_test=digits.x_test[:64], y_test=digits.y_test[:64])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small, one_thread):
    out = tmp_path_factory.mktemp("resume") / "run"
    train(_tc(out), ds=small, log=lambda s: None)
    return out


def test_checkpoints_are_atomic_checksummed_two_slots(short_run):
    found = ckpt.list_train_checkpoints(short_run)
    assert [s for s, _ in found] == [4, 3]  # the two newest of steps 1..4
    assert not list(short_run.rglob("*.tmp"))
    tensors, state = ckpt.read_train_checkpoint(found[0][1])
    assert state["epoch"] == 1 and state["batch"] == 0 and state["step"] == 4
    _, mid = ckpt.read_train_checkpoint(found[1][1])
    assert mid["epoch"] == 0 and mid["batch"] == 3  # mid-epoch position
    assert {"rng.torch", "rng.data_epoch"} <= set(tensors)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_newest_checkpoint_falls_back_to_previous_with_warning(short_run, tmp_path, small):
    run = _copy(short_run, tmp_path / "run")
    newest = ckpt.list_train_checkpoints(run)[0][1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    logs = []
    train(_tc(run, resume=True), ds=small, log=logs.append)
    assert any("warning: skipping checkpoint step-000000004" in s for s in logs), logs
    assert any("resuming from step-000000003" in s for s in logs), logs
    _assert_bitwise_equal(_tensors(short_run), _tensors(run))  # replayed the last step to the same weights


def test_bitflip_detected_by_sha256_and_all_bad_is_one_clear_error(short_run, tmp_path, small):
    run = _copy(short_run, tmp_path / "run")
    for _, p in ckpt.list_train_checkpoints(run):
        data = bytearray(p.read_bytes())
        data[-5] ^= 0x01  # inside the tensor payload: the file still parses
        p.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="sha256"):
            ckpt.read_train_checkpoint(p)
    r = CliRunner().invoke(main, ["train", "--epochs", "1", "--train-limit", "64", "--batch-size", "16",
                                  "--checkpoint-every", "1", "--seed", "5", "--quiet", "--resume", "--out", str(run)])
    assert r.exit_code == 2
    assert "no usable training checkpoint" in r.output and "Traceback" not in r.output


def test_resume_with_different_options_is_refused(short_run, tmp_path, small):
    run = _copy(short_run, tmp_path / "run")
    r = CliRunner().invoke(main, ["train", "--epochs", "1", "--train-limit", "64", "--batch-size", "32",
                                  "--seed", "5", "--quiet", "--resume", "--out", str(run)])
    assert r.exit_code == 2 and "options differ" in r.output and "batch_size=16" in r.output


def test_final_weights_checksum_verified(short_run, tmp_path):
    run = _copy(short_run, tmp_path / "run")
    other = ckpt.load_tensors(run / "model.safetensors")
    k = next(k for k, v in other.items() if v.is_floating_point())
    other[k] = other[k] + 1e-3  # valid, finite, right shapes: only the checksum can tell
    ckpt.save_tensors(run / "model.safetensors", other, {"format": ckpt.FORMAT})
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_model(run)


class _Evil:
    """Unpickling this writes a marker file: proof that code would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_checkpoint_is_refused_and_never_executed(short_run, tmp_path, kind):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    if kind == "pickle":
        evil.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}, protocol=4))
    else:
        torch.save({"state_dict": _Evil(marker)}, evil)
    assert not marker.exists()
    # 1. the file where the weights are expected
    run = _copy(short_run, tmp_path / "run")
    (run / "model.safetensors").write_bytes(evil.read_bytes())
    r = CliRunner().invoke(main, ["eval", str(run), "--limit", "8"])
    assert r.exit_code == 2 and "pickle" in r.output and "refusing" in r.output, r.output
    # 2. as the newest training checkpoint: skipped with a warning, the previous one is used
    newest = ckpt.list_train_checkpoints(run)[0][1]
    newest.write_bytes(evil.read_bytes())
    tensors, state, used = ckpt.load_latest_train_checkpoint(run, warn=lambda s: None)
    assert used != newest
    # 3. the file itself, directly, and as a run path on the command line
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load_tensors(evil)
    r = CliRunner().invoke(main, ["eval", str(evil)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not marker.exists(), "loading a checkpoint executed code"


def test_package_never_unpickles():
    root = Path(__file__).resolve().parents[1] / "stata_deploy"
    for f in root.rglob("*.py"):
        src = f.read_text()
        for bad in ("torch.load(", "pickle.load", "allow_pickle=True"):
            assert bad not in src, f"{f.name} uses {bad}"
