"""A run's setup is decided once (gpunet.training.setup): one check of resume/overwrite for the command line
and gn.fit, the folder locked once, and a setup given to fit not contradicted by its arguments."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.training import runs
from gpunet.errors import UsageError
from gpunet.training.setup import RunSetup, check
from tests.support.reliability import snapshot


def _model_and_data():
    gn.manual_seed(0)
    model = gn.models.mlp((4, 8, 3))
    rng = numpy.random.default_rng(0)
    return model, (rng.random((24, 4), dtype="float32"), rng.integers(0, 3, 24))


@pytest.mark.parametrize("by, error, message", [
    ("cli", UsageError, "--resume continues the run in the output folder and --overwrite moves it aside; give one of them"),
    ("fit", ValueError, "fit: resume=True continues the run in out_dir and overwrite=True moves it aside; give one of them"),
])
def test_resume_with_overwrite_is_refused_by_one_check_named_for_its_caller(by, error, message):
    with pytest.raises(error) as exc:
        check(True, True, False, True, by)
    assert str(exc.value) == message and type(exc.value) is error


def test_the_option_names_come_from_one_table():
    assert runs.option_names("cli")["resume"] == "--resume" and runs.option_names("fit")["resume"] == "resume=True"
    assert set(runs.option_names("cli")) == set(runs.option_names("fit")) == set(runs.OPTION_NAMES)
    assert not hasattr(runs, "FIT_OPTIONS") and not hasattr(runs, "CLI_OPTIONS")


def test_fit_builds_its_own_setup_and_locks_the_folder_once(tmp_path):
    model, train = _model_and_data()
    history = gn.fit(model, train, optimizer=gn.optim.SGD(model, lr=0.1), steps=3, batch_size=8,
                     out_dir=tmp_path / "run", progress=False, log=lambda *a: None)
    assert [r["step"] for r in history.records] == [3]
    assert (tmp_path / "run" / "last.safetensors").exists() and not (tmp_path / "run" / ".lock").exists()


def test_a_setup_given_to_fit_decides_folder_resume_and_seed(tmp_path):
    model, train = _model_and_data()
    setup = RunSetup.for_fit("cpu", tmp_path / "run", seed=5)
    history = gn.fit(model, train, optimizer=gn.optim.SGD(model, lr=0.1), steps=2, batch_size=8, setup=setup,
                     progress=False, log=lambda *a: None)
    assert [r["step"] for r in history.records] == [2] and (tmp_path / "run" / "last.safetensors").exists()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as exc:
        gn.fit(model, train, optimizer=gn.optim.SGD(model, lr=0.1), steps=2, setup=setup, seed=3, resume=True)
    assert str(exc.value) == ("fit: setup= decides the run's folder, resume, overwrite, seed and allow_data_change; "
                              "give resume, seed to the RunSetup, not to fit as well")
    assert snapshot(tmp_path) == before


def test_a_setup_on_another_device_is_refused_in_one_line():
    model, train = _model_and_data()
    setup = RunSetup(gn.backend.Device("gpu"), RunSetup.for_fit("cpu").world, None)
    with pytest.raises(ValueError) as exc:
        gn.fit(model, train, optimizer=gn.optim.SGD(model, lr=0.1), steps=1, setup=setup)
    assert str(exc.value) == ("fit: the model is on the cpu and the setup trains on the gpu; move it there first "
                              "(model.to(setup.device))")
