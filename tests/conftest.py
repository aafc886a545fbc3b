import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits():
    from stata_deploy.train.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits):
    """``digits_npz(n_train, n_test=64)``: the path of an npz of the first n_train / n_test digits (``npz:`` dataset
    files for the CLI), written once per size."""
    import numpy as np

    made: dict[tuple[int, int], object] = {}

    def make(n_train: int, n_test: int = 64):
        if (n_train, n_test) not in made:
            path = tmp_path_factory.mktemp("data") / f"digits{n_train}.npz"
            np.savez(path, x_train=digits.x_train[:n_train], y_train=digits.y_train[:n_train],
                     x_test=digits.x_test[:n_test], y_test=digits.y_test[:n_test])
            made[(n_train, n_test)] = path
        return made[(n_train, n_test)]

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits):
    """A tiny STATA-pruned model trained briefly on digits (shared by CLI/export/runtime tests)."""
    from stata_deploy.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "stata"
    train(TrainConfig(dataset="digits", model="spikformer-tiny", prune="stata", keep=0.5, epochs=2,
                      train_limit=400, out=str(out), progress=False), ds=digits, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, digits):
    """A tiny unpruned model trained briefly on digits."""
    from stata_deploy.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "base"
    train(TrainConfig(dataset="digits", model="spikformer-tiny", epochs=2, train_limit=400, out=str(out),
                      progress=False), ds=digits, log=lambda s: None)
    return out
