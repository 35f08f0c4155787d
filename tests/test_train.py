"""The fit loop: determinism, exact resume, divergence, early stopping, files, accuracy."""
from __future__ import annotations

import json

import numpy
import pytest

import gpunet as gn
from gpunet.recipes import recipe
from tests.support.reference import recipe_accuracy_on_held_out_fifth


def small_problem(n=300, seed=0):
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype("float32")
    y = (x[:, :3].sum(axis=1) > 0).astype("int64") + (x[:, 3] > 1)
    return x, y


def run(tmp_path=None, epochs=3, resume=False, seed=5, lr=0.05, dropout=0.2, **kw):
    gn.manual_seed(seed)
    model = gn.models.mlp((10, 16, 3), dropout=dropout, batch_norm=True)
    opt = gn.optim.SGD(model, lr=lr, momentum=0.9)
    x, y = small_problem()
    history = gn.fit(model, (x, y), (x[:50], y[:50]), optimizer=opt, epochs=epochs, batch_size=32,
                     schedule=gn.optim.CosineLR(opt, 40), out_dir=tmp_path, resume=resume, seed=seed,
                     progress=False, restore_best=False, **kw)
    return model, history


def test_same_seed_gives_identical_history_and_weights():
    (m1, h1), (m2, h2) = run(), run()
    assert h1.records[-1]["val_loss"] == h2.records[-1]["val_loss"]
    assert [r["train_loss"] for r in h1.records] == [r["train_loss"] for r in h2.records]
    for key in m1.state_dict():
        numpy.testing.assert_array_equal(m1.state_dict()[key], m2.state_dict()[key])
    (m3, h3) = run(seed=6)
    assert h3.records[-1]["train_loss"] != h1.records[-1]["train_loss"]


def test_resume_equals_uninterrupted(tmp_path):
    straight, h_straight = run(tmp_path / "a", epochs=4)
    run(tmp_path / "b", epochs=2)
    gn.manual_seed(999)  # the resumed run must not depend on the process's random state
    resumed, h_resumed = run(tmp_path / "b", epochs=4, resume=True)
    for key, value in straight.state_dict().items():
        numpy.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    assert [r["val_loss"] for r in h_resumed.records] == [r["val_loss"] for r in h_straight.records]


def test_mid_epoch_resume_with_step_evaluations(tmp_path):
    straight, _ = run(tmp_path / "a", epochs=None, steps=25, eval_every=7)
    run(tmp_path / "b", epochs=None, steps=14, eval_every=7)
    resumed, _ = run(tmp_path / "b", epochs=None, steps=25, eval_every=7, resume=True)
    for key, value in straight.state_dict().items():
        numpy.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


def test_output_files(tmp_path):
    run(tmp_path, epochs=2)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "last.safetensors", "history.json", "metrics.csv", "history.png"} <= names
    records = json.loads((tmp_path / "history.json").read_text())
    assert len(records) == 2
    assert {"step", "epoch", "train_loss", "val_loss", "val_accuracy"} <= set(records[0])
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,train_loss,val_loss")
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    run(tmp_path, epochs=1)
    good = (tmp_path / "last.safetensors").read_bytes()
    with pytest.raises(gn.TrainingDiverged, match=r"loss became (nan|inf) at step \d+ .*last good checkpoint: .*last.safetensors"):
        run(tmp_path, epochs=3, lr=1e30, resume=True)  # the same run, continued at a rate that diverges
    assert (tmp_path / "last.safetensors").read_bytes() == good


def test_nan_input_is_refused():
    x, y = small_problem()
    x[17, 4] = numpy.nan
    with pytest.raises(ValueError, match=r"input contains NaN or Inf \(first at index \(17, 4\)\)"):
        gn.train.ArrayData(x, y)


def test_early_stopping():
    _, history = run(epochs=30, lr=0.5, early_stopping=2)
    assert len(history) < 30
    losses = history["val_loss"]
    assert min(losses[-2:]) >= min(losses)


def test_early_stopping_carries_across_a_resume(tmp_path):
    _, straight = run(tmp_path / "a", epochs=30, lr=0.5, early_stopping=2)
    assert len(straight) < 30
    run(tmp_path / "b", epochs=len(straight) - 1, lr=0.5, early_stopping=2)
    _, resumed = run(tmp_path / "b", epochs=30, lr=0.5, early_stopping=2, resume=True)
    assert resumed["val_loss"] == straight["val_loss"] and resumed.best_step == straight.best_step


def test_without_validation_data_the_train_loss_picks_the_saved_model(tmp_path):
    gn.manual_seed(0)
    model = gn.models.mlp((10, 16, 3))
    x, y = small_problem()
    history = gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=0.05), epochs=4, batch_size=32,
                     out_dir=tmp_path, progress=False)
    assert history["val_loss"] == [None] * 4
    best = min(history.records, key=lambda r: r["train_loss"])
    assert history.best_step == best["step"] and (tmp_path / "model.safetensors").exists()


def test_loop_state_reads_the_names_an_older_gpunet_saved():
    from gpunet.training.resume import LoopState

    old = {"step": 7, "epoch": 1, "batch": 2, "sample": 64, "best_val": 0.25, "stale": 1, "best_step": 5,
           "last_step": 7}
    state = LoopState.from_json(old)
    assert (state.step, state.sample, state.best_loss, state.stale, state.best_step) == (7, 64, 0.25, 1, 5)
    assert LoopState.from_json(state.to_json()) == state


def test_fit_argument_errors():
    model = gn.models.mlp((10, 3))
    with pytest.raises(ValueError, match="exactly one of epochs or steps"):
        gn.fit(model, small_problem(), optimizer=gn.optim.SGD(model, 0.1))
    with pytest.raises(ValueError, match="300 inputs but 299 labels"):
        x, y = small_problem()
        gn.fit(model, (x, y[:-1]), optimizer=gn.optim.SGD(model, 0.1), epochs=1)


@pytest.mark.slow
def test_default_mlp_recipe_reaches_95_percent_on_held_out_fifth_of_the_sample():
    assert recipe_accuracy_on_held_out_fifth("mlp", epochs=recipe("mlp").epochs) >= 0.95
