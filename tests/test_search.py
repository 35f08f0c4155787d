"""gpunet search: trials.csv, best/, resuming, seeding, space files, pruning, and the held-out split.

Trials are tiny (the MLP, a few optimizer steps on the embedded sample): these tests check the
bookkeeping, not what a search finds.
"""
from __future__ import annotations

import builtins
import csv
import json

import numpy
import pytest

import gpunet as gn
from gpunet.cli import main
from gpunet.search import study, trial as trial_run


SMALL = ["--model", "mlp", "--steps", "2", "--device", "cpu"]


def read_rows(folder):
    with open(folder / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def params_of(rows):
    return [{k: v for k, v in r.items() if k not in ("val_loss", "val_accuracy", "seconds")} for r in rows]


def test_a_search_writes_one_run_folder_and_row_per_trial_and_keeps_the_best(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", *SMALL, "--trials", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("trial ") >= 3 and "(3/3)" in text
    rows = read_rows(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"complete"}
    assert {"lr", "batch_size", "weight_decay", "warmup", "hidden1", "hidden2", "dropout"} <= set(rows[0])
    for r in rows:  # each row is what its ordinary run folder says
        history = json.loads((out / r["folder"] / "history.json").read_text())
        best = min(history, key=lambda rec: rec["val_loss"])
        assert float(r["val_loss"]) == pytest.approx(best["val_loss"])
        assert float(r["val_accuracy"]) == pytest.approx(best["val_accuracy"])
        assert int(r["steps"]) == history[-1]["step"] == 2
        assert 1e-6 <= float(r["weight_decay"]) <= 1e-3 and int(r["batch_size"]) in (32, 64, 128, 256)
        model = gn.load(out / r["folder"] / "model.safetensors")
        assert model.params["0.weight"].shape == (int(r["hidden1"]), 784)
    winner = min(rows, key=lambda r: float(r["val_loss"]))
    assert json.loads((out / "best" / "trial.json").read_text())["trial"] == int(winner["trial"])
    for name in ("model.safetensors", "history.json"):
        assert (out / "best" / name).read_bytes() == (out / winner["folder"] / name).read_bytes()
    # the best model scores on the selection split what its trial recorded (an independent re-evaluation)
    data = trial_run.load(gn.recipes.recipe("mlp"), "mnist-sample", None, False, 0.1, 0, 0)
    again = gn.evaluate(gn.load(out / "best" / "model.safetensors"), *data.select)
    assert again["loss"] == pytest.approx(float(winner["val_loss"]), rel=1e-5)


def test_the_same_command_resumes_and_the_seed_fixes_every_trial(tmp_path, monkeypatch):
    calls = []
    real_run = trial_run.run

    def counting_run(*args, **kwargs):
        calls.append(kwargs["out"].name)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(trial_run, "run", counting_run)
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    assert main(["search", *SMALL, "--trials", "2", "--seed", "5", "--out", str(resumed)]) == 0
    first = read_rows(resumed)
    assert main(["search", *SMALL, "--trials", "3", "--seed", "5", "--out", str(resumed)]) == 0
    assert calls == ["trial-000", "trial-001", "trial-002"]  # finished trials were not run again
    assert read_rows(resumed)[:2] == first
    assert main(["search", *SMALL, "--trials", "3", "--seed", "5", "--out", str(fresh)]) == 0
    assert params_of(read_rows(fresh)) == params_of(read_rows(resumed))  # same seed: same trials, resumed or not
    other = tmp_path / "other"
    assert main(["search", *SMALL, "--trials", "1", "--seed", "6", "--out", str(other)]) == 0
    assert read_rows(other)[0]["lr"] != read_rows(fresh)[0]["lr"]


def test_an_interrupted_trial_runs_again_with_the_same_parameters(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    real_run, calls = trial_run.run, []

    def interrupted_second(recipe, data, params, trial, **kwargs):
        calls.append((kwargs["out"].name, params))
        if len(calls) == 2:
            raise gn.train.TrainingInterrupted("interrupted at step 1")
        return real_run(recipe, data, params, trial, **kwargs)

    monkeypatch.setattr(trial_run, "run", interrupted_second)
    with pytest.raises(SystemExit) as exc:
        main(["search", *SMALL, "--trials", "2", "--out", str(out)])
    assert exc.value.code == 130
    assert "interrupted in trial 1; run the same command again" in capsys.readouterr().err
    assert [r["trial"] for r in read_rows(out)] == ["0"]
    assert main(["search", *SMALL, "--trials", "2", "--out", str(out)]) == 0
    assert [name for name, _ in calls] == ["trial-000", "trial-001", "trial-001"]
    assert calls[2][1] == calls[1][1]
    assert [r["state"] for r in read_rows(out)] == ["complete", "complete"]


def test_a_space_file_replaces_the_default_space(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('hidden1 = 24\nhidden2 = 12\ndropout = 0.0\nbatch_size = {choices = [64]}\n'
                     'lr = {low = 1e-3, high = 2e-3, log = true}\n')
    out = tmp_path / "s"
    assert main(["search", *SMALL, "--trials", "2", "--space", str(space), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert set(rows[0]) >= {"lr", "hidden1", "batch_size"} and "weight_decay" not in rows[0]
    assert all(1e-3 <= float(r["lr"]) <= 2e-3 and r["hidden1"] == "24" and r["batch_size"] == "64" for r in rows)
    model = gn.load(out / "trials" / "trial-001" / "model.safetensors")
    assert [p.shape for p in model.params.values()] == [(24, 784), (24,), (12, 24), (12,), (10, 12), (10,)]
    with pytest.raises(SystemExit, match="other settings .*space"):  # a resume with another space is refused
        main(["search", *SMALL, "--trials", "2", "--out", str(out)])


def test_a_space_may_set_the_random_shift_of_image_models_only(tmp_path, monkeypatch, capsys):
    shifts, real_fit = [], gn.fit

    def recording_fit(model, train, *args, **kwargs):
        shifts.append(train.shift)
        return real_fit(model, train, *args, **kwargs)

    monkeypatch.setattr(gn, "fit", recording_fit)
    space = tmp_path / "space.json"
    space.write_text('{"shift": {"choices": [3]}, "hidden1": 8, "hidden2": 4}')
    assert main(["search", *SMALL, "--trials", "1", "--space", str(space), "--out", str(tmp_path / "s")]) == 0
    assert read_rows(tmp_path / "s")[0]["shift"] == "3"
    assert main(["search", *SMALL, "--trials", "1", "--out", str(tmp_path / "default")]) == 0
    assert shifts == [3, gn.recipes.recipe("mlp").shift]  # without one in the space: the recipe's
    text_space = tmp_path / "text.json"
    text_space.write_text('{"shift": 1}')
    with pytest.raises(SystemExit):
        main(["search", "--model", "rnn", "--steps", "2", "--device", "cpu", "--trials", "1",
              "--space", str(text_space), "--out", str(tmp_path / "t")])
    assert "unknown parameter 'shift' for --model rnn" in capsys.readouterr().err


def test_optimizer_and_momentum_reach_every_trial(tmp_path, monkeypatch, capsys):
    made, real_fit = [], gn.fit

    def recording_fit(model, train, *args, optimizer=None, **kwargs):
        made.append((type(optimizer).__name__, optimizer.hyper.get("momentum")))
        return real_fit(model, train, *args, optimizer=optimizer, **kwargs)

    monkeypatch.setattr(gn, "fit", recording_fit)
    space = tmp_path / "space.json"
    space.write_text('{"momentum": 0.9, "hidden1": 8, "hidden2": 4}')
    out = tmp_path / "s"
    assert main(["search", *SMALL, "--trials", "1", "--optimizer", "sgd", "--space", str(space),
                 "--out", str(out)]) == 0
    assert made == [("SGD", 0.9)] and read_rows(out)[0]["momentum"] == "0.9"
    with pytest.raises(SystemExit, match="other settings .*optimizer 'sgd' -> 'adamw'"):
        main(["search", *SMALL, "--trials", "2", "--optimizer", "adamw", "--out", str(out)])
    plain = tmp_path / "plain"
    assert main(["search", *SMALL, "--trials", "1", "--optimizer", "sgd", "--out", str(plain)]) == 0
    with pytest.raises(SystemExit, match="other settings .*optimizer 'sgd' -> None"):  # resumed with adam
        main(["search", *SMALL, "--trials", "2", "--out", str(plain)])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # momentum without sgd: refused before any work
        main(["search", *SMALL, "--trials", "1", "--space", str(space), "--out", str(tmp_path / "adam")])
    err = capsys.readouterr().err.strip()
    assert err.endswith("space: momentum is a setting of the sgd optimizer, not of adam (gpunet search "
                        "--optimizer sgd)") and len(err.splitlines()) == 1
    assert not (tmp_path / "adam").exists() and made[1:] == [("SGD", 0.0)]


@pytest.mark.parametrize("text, suffix, message", [
    ('{"lr": {"low": 0.1, "high": 0.01}}', ".json", "'lr': low (0.1) must be below high (0.01)"),
    ('{"widht": 3}', ".json", "unknown parameter 'widht' for --model mlp"),
    ('{"hidden1": {"low": 10, "high": 20.5}}', ".json", "'hidden1': must be a whole number, got 20.5"),
    ('{"lr": {"low": 0, "high": 1, "log": true}}', ".json", "'lr': a log range needs low > 0"),
    ('{"batch_size": {"choices": []}}', ".json", "'batch_size': choices must be a non-empty list"),
    ("lr = [", ".toml", "not valid TOML"),
])
def test_a_bad_space_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, suffix, message):
    space = tmp_path / f"space{suffix}"
    space.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["search", *SMALL, "--trials", "1", "--space", str(space), "--out", str(tmp_path / "s")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpunet search: ") and str(space) in err and message in err
    assert not (tmp_path / "s").exists()  # refused before any work


def test_without_optuna_the_search_says_how_to_add_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(SystemExit) as exc:
        main(["search", *SMALL, "--trials", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1
    assert "pip install 'gpunet[search]'" in err and not (tmp_path / "s").exists()


def test_pruned_trials_stop_early_and_are_marked(tmp_path, monkeypatch, capsys):
    # a pruner that stops every trial at its second evaluation: the marking is what is tested
    monkeypatch.setattr(study, "_pruner", lambda optuna, kind, evaluations: optuna.pruners.ThresholdPruner(upper=0.0,
                                                                                              n_warmup_steps=2))
    out = tmp_path / "s"
    assert main(["search", "--model", "mlp", "--steps", "10", "--device", "cpu", "--trials", "2",
                 "--out", str(out)]) == 1  # no trial completed
    rows = read_rows(out)
    assert [r["state"] for r in rows] == ["pruned", "pruned"]
    assert all(int(r["steps"]) == 2 for r in rows)  # stopped after the second of ten evaluations
    history = json.loads((out / "trials" / "trial-000" / "history.json").read_text())
    assert [rec["step"] for rec in history] == [1, 2]
    assert not (out / "best").exists() and "no trial completed" in capsys.readouterr().out


def test_holdout_keeps_the_last_images_out_of_training_and_validation():
    x, y = gn.data.load_mnist_sample()
    ds = gn.data.load_dataset("mnist-sample", holdout=2000, val_fraction=0.1, seed=3)
    numpy.testing.assert_array_equal(ds.x_holdout, x[6000:])
    numpy.testing.assert_array_equal(ds.y_holdout, y[6000:])
    seen = numpy.concatenate([ds.x_train, ds.x_val]).reshape(6000, -1)
    expected = x[:6000].reshape(6000, -1)
    order = numpy.lexsort(seen.T), numpy.lexsort(expected.T)  # the same images, split at random
    numpy.testing.assert_array_equal(seen[order[0]], expected[order[1]])
    assert len(ds.x_val) == 600
    with pytest.raises(ValueError, match="holdout must be a whole number of images from 0 to 7998"):
        gn.data.load_dataset("mnist-sample", holdout=7999)
    with pytest.raises(ValueError, match="holdout takes images"):
        gn.data.load_dataset("shakespeare", holdout=10)


def test_train_with_holdout_scores_the_saved_model_on_the_held_out_images(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "20", "--device", "cpu", "--holdout", "1500", "--out", str(out),
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("held out: accuracy ") and "on the last 1500 images of mnist-sample" in line
    x, y = gn.data.load_mnist_sample()
    expected = gn.evaluate(gn.load(out / "model.safetensors"), x[6500:], y[6500:].astype("int64"))
    assert float(line.split()[3]) == pytest.approx(expected["accuracy"], abs=5e-5)
    assert float(line.split()[5]) == pytest.approx(expected["loss"], abs=5e-5)
