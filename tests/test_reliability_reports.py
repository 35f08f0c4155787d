"""Issue 13, part 2: reports are true. Divergence (exact step, last finite checkpoint kept, nothing
non-finite saved, strict JSON), "saved" only for files this run wrote, Ctrl-C, and resume with
changed hyper-parameters (refused with the differences, or applied and said)."""
from __future__ import annotations

import json
import os
import signal
import types

import numpy
import pytest

import gpunet as gn
from gpunet.training.divergence import DivergenceWatch, first_non_finite_tensor
from tests import gpu_standin
from tests.support.arrays import ON_STANDIN
from tests.support.reliability import cli, one_error_line, snapshot

TRAIN = ["train", "--steps", "2", "--device", "cpu", "--no-progress"]


def problem(n=96, seed=0):
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((n, 6)).astype("float32")
    return x, (x[:, :2].sum(axis=1) > 0).astype("int64")


class Data(gn.train.ArrayData):
    """ArrayData that records the samples it served, and can poison or interrupt one batch."""

    def __init__(self, x, y, poison_at=None, interrupt_at=None):
        super().__init__(x, y)
        self.calls, self.served, self.poison_at, self.interrupt_at = 0, [], poison_at, interrupt_at

    def get(self, indices, rng):
        self.calls += 1
        self.served.append(numpy.array(indices))
        x, y = super().get(indices, rng)
        if self.calls == self.poison_at:
            x = x * numpy.float32(numpy.inf)
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, in the middle of a step
        return x, y


def train(out, data, steps=6, lr=0.1, batch_size=16, resume=False, optimizer=None, seed=0, log=None, **kw):
    gn.manual_seed(seed)
    model = gn.models.mlp((6, 8, 2))
    opt = (optimizer or gn.optim.SGD)(model, lr=lr)
    x, y = problem(32, seed=1)
    history = gn.fit(model, data, (x, y), optimizer=opt, steps=steps, batch_size=batch_size, eval_every=2,
                     out_dir=out, resume=resume, progress=False, restore_best=False, seed=seed,
                     log=log or (lambda *a: None), **kw)
    return model, opt, history


def test_cli_diverged_run_reports_the_step_saves_nothing_and_exits_1(tmp_path, capsys):
    out = tmp_path / "run"
    code, text, err = cli(TRAIN[:2] + ["1", "--lr", "1e30", "--device", "cpu", "--no-progress", "--out", out], capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith("gpunet train: validation loss became nan at step 1 (epoch 1)")
    assert "no checkpoint was saved" in line and "--lr" in line and "--clip-norm" in line
    assert "best (saved)" not in text and "wrote" not in text
    assert not (out / "model.safetensors").exists() and not (out / "last.safetensors").exists()
    records = json.loads((out / "history.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert records[-1]["diverged"] is True and records[-1]["val_loss"] is None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_after_an_evaluation_keeps_the_last_finite_checkpoint(tmp_path):
    x, y = problem()
    out = tmp_path / "run"
    train(out, Data(x, y), steps=2)  # a clean first part...
    good = snapshot(out)
    with pytest.raises(gn.TrainingDiverged) as exc:
        train(out, Data(x, y, poison_at=1), steps=6, resume=True)  # ...then a NaN loss at step 3
    message = str(exc.value)
    assert message.startswith("loss became nan at step 3 (epoch 1)")
    assert f"last good checkpoint: {out / 'last.safetensors'} (step 2)" in message
    after = snapshot(out)
    for name in ("model.safetensors", "last.safetensors"):
        assert after[name] == good[name]  # nothing non-finite written as best or last
    records = json.loads((out / "history.json").read_text(), parse_constant=pytest.fail)
    assert records[-1] == {"step": 3, "epoch": 1, "train_loss": None, "val_loss": None, "diverged": True}
    gn.load(out / "model.safetensors")  # still a good model


def test_the_device_watch_records_the_first_bad_step_without_reading_the_loss():
    fake_xp = types.SimpleNamespace(stack=numpy.stack, isfinite=numpy.isfinite)  # not numpy:
    watch = DivergenceWatch(fake_xp)  # takes the device code path, written against xp
    for step, loss in enumerate([1.0, 2.0, numpy.inf, numpy.nan, 3.0], start=1):
        watch.observe(numpy.asarray(loss, dtype="float32"), step)
    assert watch.first_bad() == (3, numpy.inf)
    host = DivergenceWatch()
    for step, loss in enumerate([1.0, numpy.nan, numpy.inf], start=1):
        host.observe(numpy.float32(loss), step)
    assert host.first_bad()[0] == 2 and numpy.isnan(host.first_bad()[1])


def fit_on(device, data, out=None, steps=10, **kw):
    """An SGD fit of a linear classifier on device; with 300 samples and batches of 16 its only
    evaluation is the last step (10), so a divergence is seen by the watch, not by a periodic read.
    (Linear: a NaN input gives a NaN loss on every device, whatever an activation does with NaN.)"""
    gn.manual_seed(0)
    model = gn.models.mlp((6, 2))
    model.to(device)
    x, y = problem(32, seed=1)
    return gn.fit(model, data, (x, y), optimizer=gn.optim.SGD(model, lr=0.1), steps=steps, batch_size=16,
                  out_dir=out, progress=False, restore_best=False, **kw)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("interrupt_at", [None, 5], ids=["to-the-end", "ctrl-c-after"])
def test_divergence_names_the_first_bad_step_on_every_device(device, tmp_path, interrupt_at):
    x, y = problem(300)
    out = tmp_path / "run"
    with pytest.raises(gn.TrainingDiverged) as exc:
        try:
            fit_on(device, Data(x, y, poison_at=3, interrupt_at=interrupt_at), out)
        except gn.train.TrainingInterrupted as stopped:  # a KeyboardInterrupt: it would end the whole session
            pytest.fail(f"Ctrl-C saved nothing instead of naming the bad step: {stopped}")
    assert str(exc.value).startswith("loss became nan at step 3 (epoch 1); training stopped; no checkpoint was saved")
    records = json.loads((out / "history.json").read_text(), parse_constant=pytest.fail)
    assert records == [{"step": 3, "epoch": 1, "train_loss": None, "val_loss": None, "diverged": True}]
    assert not (out / "last.safetensors").exists() and not (out / "model.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts transfers on the CuPy stand-in")
def test_the_divergence_watch_adds_no_device_to_host_read_per_step():
    x, y = problem(400)  # 25 batches of 16: neither run reaches a periodic read or an epoch end
    reads = []
    fit_on("gpu", Data(x, y), steps=1)  # (the GEMM dispatch checks a new size class's paths once, reading the host)
    for steps in (10, 20):
        with gpu_standin.counting() as done:
            fit_on("gpu", Data(x, y), steps=steps)
        reads.append(done["d2h"])
    assert reads[0] == reads[1]  # the reads are those of the last evaluation, whatever the number of steps


def test_non_finite_weights_are_found_by_name():
    model = gn.models.mlp((3, 4, 2))
    assert first_non_finite_tensor(model) is None
    model.params["2.bias"][1] = numpy.nan
    assert first_non_finite_tensor(model) == "2.bias"


def test_ctrl_c_saves_what_resume_needs_and_resume_is_exact(tmp_path):
    x, y = problem()
    straight, _, h_straight = train(tmp_path / "a", Data(x, y), steps=9)
    with pytest.raises(gn.train.TrainingInterrupted, match=r"interrupted at step 5; saved .*last.safetensors"):
        train(tmp_path / "b", Data(x, y, interrupt_at=5), steps=9)
    resumed, _, h_resumed = train(tmp_path / "b", Data(x, y), steps=9, resume=True)
    for name, value in straight.params.items():
        numpy.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    assert [r["train_loss"] for r in h_resumed.records] == [r["train_loss"] for r in h_straight.records]


def test_cli_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path, capsys, monkeypatch):
    calls = []
    original = gn.train.ArrayData.get

    def get(self, indices, rng):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, indices, rng)

    monkeypatch.setattr(gn.train.ArrayData, "get", get)
    out = tmp_path / "run"
    code, _, err = cli(TRAIN[:2] + ["50", "--device", "cpu", "--no-progress", "--out", out], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err
    assert last == f"gpunet train: interrupted at step 3; saved {out / 'last.safetensors'}: run the same command " \
                   "with --resume to continue"
    monkeypatch.setattr(gn.train.ArrayData, "get", original)
    code, text, _ = cli(TRAIN[:2] + ["4", "--device", "cpu", "--no-progress", "--out", out, "--resume"], capsys)
    assert code == 0 and "final: step 4" in text


def test_resume_with_another_experiment_is_refused_with_every_difference(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(TRAIN + ["--out", out], capsys)[0] == 0
    before = snapshot(out)
    code, _, err = cli(TRAIN + ["--out", out, "--resume", "--seed", "3", "--val-fraction", "0.2", "--optimizer", "sgd"],
                       capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"gpunet train: cannot resume {out / 'last.safetensors'}: ")
    for diff in ("optimizer: \"Adam\" -> \"SGD\"", "seed: 0 -> 3", "val_fraction: 0.1 -> 0.2"):
        assert diff in line
    assert snapshot(out) == before


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path):
    x, y = problem()
    train(tmp_path, Data(x, y), steps=2, lr=0.1)
    said = []
    _, opt, _ = train(tmp_path, Data(x, y), steps=4, lr=0.05, resume=True, log=said.append)
    assert opt.lr == 0.05
    assert said == ["resume: applying changed settings from step 2: lr: 0.1 -> 0.05"]


def test_resume_with_a_new_batch_size_goes_on_from_the_same_sample(tmp_path):
    x, y = problem(96)
    first = Data(x, y)
    train(tmp_path, first, steps=2, batch_size=16)  # 32 samples of epoch 0 served
    said, second = [], Data(x, y)
    train(tmp_path, second, steps=10, batch_size=10, resume=True, log=said.append)
    assert "batch_size: 16 -> 10" in said[0]
    epoch0 = numpy.concatenate(first.served + second.served[:7])  # 32 + 6 x 10 + 4 = 96
    assert sorted(epoch0.tolist()) == list(range(96))  # every sample once: none skipped, none repeated
    assert [len(s) for s in second.served[:8]] == [10] * 6 + [4, 10]


def test_resume_with_a_new_batch_size_keeps_the_epochs_asked_for(tmp_path):
    x, y = problem(200)
    out, said = tmp_path / "run", []

    def fit(data, batch_size, resume):
        gn.manual_seed(0)
        model = gn.models.mlp((6, 8, 2))
        vx, vy = problem(32, seed=1)
        return gn.fit(model, data, (vx, vy), optimizer=gn.optim.SGD(model, lr=0.1), epochs=2, batch_size=batch_size,
                      out_dir=out, resume=resume, progress=False, restore_best=False, log=said.append)

    first = Data(x, y, interrupt_at=5)
    with pytest.raises(gn.train.TrainingInterrupted, match="interrupted at step 5"):
        fit(first, 20, False)  # 100 of epoch 0's 200 samples served, no evaluation yet
    second = Data(x, y)
    history = fit(second, 10, True)
    assert said == ["resume: applying changed settings from step 5: batch_size: 20 -> 10"]
    served = first.served + second.served
    assert sum(len(s) for s in served) == 2 * 200  # two epochs, not more
    assert sorted(numpy.concatenate(served[:15]).tolist()) == list(range(200))  # epoch 0: 5 x 20 + 10 x 10
    assert sorted(numpy.concatenate(served[15:]).tolist()) == list(range(200))  # epoch 1: 20 x 10
    assert [(r["step"], r["epoch"]) for r in history.records] == [(15, 1), (35, 2)]  # at each epoch end


def test_saved_is_only_said_for_files_this_run_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(TRAIN + ["--out", out], capsys)[0] == 0
    before = snapshot(out)
    code, text, _ = cli(TRAIN + ["--out", out, "--resume"], capsys)  # already at step 2: nothing to train
    assert code == 0 and "nothing to train" in text
    assert "best (saved)" not in text
    assert f"best: step 2 " in text and f"(saved before this run in {out / 'model.safetensors'})" in text
    wrote = next(line for line in text.splitlines() if line.startswith("wrote "))
    assert "model.safetensors" not in wrote and "last.safetensors" not in wrote
    after = snapshot(out)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert after["last.safetensors"] == before["last.safetensors"]


def test_eval_line_is_strict_json_even_for_a_broken_model(tmp_path, capsys):
    model = gn.models.mlp((784, 10))
    model.params["0.bias"][:] = numpy.nan
    model.preprocess = gn.data.image_preprocess(numpy.arange(256, dtype="uint8").reshape(1, 16, 16), (784,))
    gn.save(model, tmp_path / "m.safetensors")
    gn.data.write_idx(tmp_path / "i.idx", numpy.zeros((4, 28, 28), "uint8"))
    gn.data.write_idx(tmp_path / "l.idx", numpy.arange(4, dtype="uint8"))
    code, text, _ = cli(["eval", tmp_path / "m.safetensors", "--images", tmp_path / "i.idx", "--labels",
                         tmp_path / "l.idx", "--device", "cpu"], capsys)
    result = json.loads(text.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert code == 0 and result["loss"] is None and result["samples"] == 4


def test_a_last_checkpoint_from_before_this_change_still_resumes_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    x, y = problem()
    straight, _, _ = train(tmp_path / "a", Data(x, y), steps=6)
    train(tmp_path / "b", Data(x, y), steps=3)  # stops mid-epoch (96 samples, batches of 16)
    last = tmp_path / "b" / "last.safetensors"
    with safe_open(str(last), "np") as f:
        meta = f.metadata()
    training = json.loads(meta["training"])
    del training["config"]
    for key in ("sample", "best_step", "last_step", "running", "running_count"):
        del training["state"][key]
    training["state"]["best_val"] = training["state"].pop("best_loss")  # its older name
    meta["training"] = json.dumps(training)
    del meta["checksums"]
    save_file(load_file(str(last)), str(last), metadata=meta)  # as an older gpunet wrote it
    resumed, _, _ = train(tmp_path / "b", Data(x, y), steps=6, resume=True)
    for name, value in straight.params.items():
        numpy.testing.assert_array_equal(resumed.params[name], value, err_msg=name)


def test_an_evaluation_interval_an_older_gpunet_derived_is_not_a_change(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    x, y = problem()  # 96 samples: 6 batches of 16 an epoch
    said = []

    def fit(steps, resume):
        gn.manual_seed(0)
        model = gn.models.mlp((6, 8, 2))
        return gn.fit(model, Data(x, y), optimizer=gn.optim.SGD(model, lr=0.1), steps=steps, batch_size=16,
                      out_dir=tmp_path, resume=resume, progress=False, log=said.append)

    fit(3, False)
    last = tmp_path / "last.safetensors"
    with safe_open(str(last), "np") as f:
        meta = f.metadata()
    training = json.loads(meta["training"])
    assert training["config"]["eval_every"] is None  # saved as given: at each epoch end
    training["config"]["eval_every"] = 6  # as an older gpunet saved it: the batches of an epoch, derived
    meta["training"] = json.dumps(training)
    del meta["checksums"]
    save_file(load_file(str(last)), str(last), metadata=meta)
    history = fit(8, True)
    assert said == [] and [r["step"] for r in history.records] == [3, 6, 8]  # then the epoch end and the end
