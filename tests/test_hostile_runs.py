"""Issue 26: runs under hostile conditions. SIGTERM and SIGHUP save what --resume needs as Ctrl-C
does (exit 143, 129; a second signal cuts a save short without damaging a file; nohup's ignored
SIGHUP stays ignored), a resume on changed data is refused unless allowed (runs saved before the
data's fingerprint still resume), and partial or unwritable run folders and a full disk end in one
line with every file that was there before unchanged."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

import gpunet as gn
import gpunet.cli as command_line
from gpunet import files
from gpunet.training import resume
from tests.support.reliability import FullDisk, cli, one_error_line, snapshot
from tests.test_reliability_reports import Data, problem, train

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "run_folders"
TRAIN = ["train", "--device", "cpu", "--no-progress"]
SAVED = "run the same command with --resume to continue"


# ---------------------------------------------------------------- signals, from outside the process
def start(out, data, steps, **popen):
    """`python -m gpunet train` of the mlp on the images of image_folder in batches of 8 into out (13
    batches an epoch: an evaluation every 150 steps of 3000, every 15 of 300), in the background."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "gpunet", *TRAIN, "--data", str(data), "--batch-size", "8",
                             "--steps", str(steps), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def first_evaluation(out, process, timeout=180):
    """Wait until the run's first evaluation wrote last.safetensors (fit handles signals by then)."""
    deadline = time.monotonic() + timeout
    while not (out / "last.safetensors").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no evaluation in time"
        time.sleep(0.05)


def run_files(folder) -> dict:
    """snapshot of folder without its .lock (held while the run trains, removed when it ends)."""
    return {name: value for name, value in snapshot(folder).items() if name != ".lock"}


def saved_step(path) -> int:
    return gn.training.checkpoint.read_checkpoint(path)[2]["training"]["state"]["step"]


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_mid_training_saves_exits_128_plus_the_signal_and_resumes(tmp_path, capsys, signame,
                                                                                   code):
    out, data = tmp_path / "run", image_folder(tmp_path / "data")
    # the signal's default disposition in the run, whatever this process inherited (a suite started under nohup
    # passes SIGHUP ignored on, which the run then rightly keeps: test_nohup_keeps_sighup_ignored_...)
    process = start(out, data, 3000, preexec_fn=lambda: signal.signal(getattr(signal, signame), signal.SIG_DFL))
    first_evaluation(out, process)
    process.send_signal(getattr(signal, signame))
    stdout, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    step = saved_step(out / "last.safetensors")
    assert process.returncode == code and "Traceback" not in stderr
    assert lines == [f"gpunet: {signame}: stopping after this step and saving what --resume needs (a second signal "
                     "stops at once)",
                     f"gpunet train: interrupted by {signame} at step {step}; saved {out / 'last.safetensors'}: "
                     f"{SAVED}"]
    assert 150 <= step < 3000 and "final:" not in stdout  # saved mid-way, at or after the evaluation at 150
    records = json.loads((out / "history.json").read_text())
    assert records[0]["step"] == 150
    before = snapshot(out)
    assert not (out / ".lock").exists() and not any(p.name.endswith(".tmp") for p in out.iterdir())
    # --resume goes on from that step (15 more steps: eval_every follows --steps, which it says)
    code, text, err = cli(TRAIN + ["--data", data, "--batch-size", "8", "--steps", str(step + 15), "--out", out,
                                   "--resume"], capsys)
    assert code == 0 and err == "" and "(resumed)" in text and f"final: step {step + 15} " in text
    assert saved_step(out / "last.safetensors") == step + 15
    assert json.loads((out / "history.json").read_text())[:len(records)] == records
    assert set(before) <= set(snapshot(out))


def test_nohup_keeps_sighup_ignored_and_the_run_ends_normally(tmp_path):
    out, data = tmp_path / "run", image_folder(tmp_path / "data")
    process = start(out, data, 300, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    first_evaluation(out, process)
    process.send_signal(signal.SIGHUP)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0 and stderr == "" and "final: step 300 " in stdout
    assert saved_step(out / "last.safetensors") == 300


# ---------------------------------------------------------------- signals, in this process
class Signalling(Data):
    """Data that sends signum to this process in the middle of batch `at` (as kill would)."""

    def __init__(self, x, y, at, signum):
        super().__init__(x, y)
        self.at, self.signum = at, signum

    def get(self, indices, rng):
        batch = super().get(indices, rng)
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return batch


def test_fit_raises_training_interrupted_for_sigterm_and_resume_is_exact(tmp_path):
    x, y = problem()
    straight, _, h_straight = train(tmp_path / "a", Data(x, y), steps=9)
    with pytest.raises(gn.train.TrainingInterrupted) as stopped:
        train(tmp_path / "b", Signalling(x, y, 5, signal.SIGTERM), steps=9)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signum == signal.SIGTERM
    last = tmp_path / "b" / "last.safetensors"
    assert str(stopped.value) == f"interrupted by SIGTERM at step 5; saved {last}: {SAVED}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    resumed, _, h_resumed = train(tmp_path / "b", Data(x, y), steps=9, resume=True)
    for name, value in straight.params.items():
        numpy.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    assert [r["train_loss"] for r in h_resumed.records] == [r["train_loss"] for r in h_straight.records]


SECOND = {"SIGTERM": ("gpunet: SIGTERM: stopping after this step and saving what --resume needs (a second signal "
                      "stops at once)", 143),
          "SIGINT": ("gpunet: stopping after this step and saving what --resume needs (Ctrl-C again stops at once)",
                     130)}


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_second_signal_while_saving_leaves_the_last_checkpoint_whole(tmp_path, capsys, monkeypatch, signame):
    """The first signal (in step 7) asks for a save after the step; a second one arrives while
    last.safetensors is being written: the write is cut short, its temporary removed, and the
    checkpoint of the evaluation at step 6 stays as it was (40 steps: an evaluation every 2)."""
    out, data, calls, seen = tmp_path / "run", image_folder(tmp_path / "data"), [], {}
    get, fsync = gn.train.ArrayData.get, os.fsync

    def signalling_get(self, indices, rng):
        calls.append(1)
        if len(calls) == 7:
            seen["before"] = run_files(out)  # the evaluation at step 6 wrote these
            os.kill(os.getpid(), getattr(signal, signame))
        return get(self, indices, rng)

    def signalling_fsync(fd):
        if "before" in seen and "second" not in seen:
            seen["second"] = True
            os.kill(os.getpid(), getattr(signal, signame))  # in the middle of atomic_write, before its rename
        return fsync(fd)

    monkeypatch.setattr(gn.train.ArrayData, "get", signalling_get)
    monkeypatch.setattr(files.os, "fsync", signalling_fsync)
    code, text, err = cli(TRAIN + ["--data", data, "--steps", "40", "--out", out], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    notice, status = SECOND[signame]
    second = "Ctrl-C" if signame == "SIGINT" else signame
    assert code == status and "Traceback" not in err
    assert lines == [notice, f"gpunet train: stopped at once by a second {second}: the run folder holds what its last "
                             "complete save wrote"]
    assert snapshot(out) == seen["before"]  # no file changed, no temporary left, the lock removed
    assert saved_step(out / "last.safetensors") == 6
    monkeypatch.undo()
    code, text, _ = cli(TRAIN + ["--data", data, "--steps", "40", "--out", out, "--resume"], capsys)
    assert code == 0 and "final: step 40 " in text


def test_sigterm_before_training_ends_in_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(TRAIN + ["--steps", "1"], capsys)[0] == 0
    earlier = (tmp_path / "runs" / "latest").resolve()
    before = snapshot(tmp_path)
    load = command_line.load_dataset

    def killed_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(command_line, "load_dataset", killed_while_loading)
    code, _, err = cli(TRAIN + ["--steps", "1"], capsys)
    assert code == 143 and one_error_line(err) == "gpunet train: interrupted by SIGTERM"
    assert snapshot(tmp_path) == before and (tmp_path / "runs" / "latest").resolve() == earlier
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([earlier.name, "latest"])  # none made
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_in_a_search_trial_exits_143_and_the_search_resumes(tmp_path, capsys, monkeypatch):
    out, calls = tmp_path / "s", []
    get = gn.train.ArrayData.get

    def signalling_get(self, indices, rng):
        calls.append(1)
        if len(calls) == 3:  # trial 1, its first step (2 steps a trial)
            os.kill(os.getpid(), signal.SIGTERM)
        return get(self, indices, rng)

    monkeypatch.setattr(gn.train.ArrayData, "get", signalling_get)
    search = ["search", "--model", "mlp", "--steps", "2", "--device", "cpu", "--trials", "2", "--out", out]
    code, _, err = cli(search, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143 and "Traceback" not in err
    assert lines[-1] == ("gpunet search: interrupted by SIGTERM in trial 1; run the same command again to resume the "
                         "search (trial 1 starts over)")
    kept = snapshot(out / "trials" / "trial-000")
    assert cli(search, capsys)[0] == 0
    assert snapshot(out / "trials" / "trial-000") == kept  # the finished trial was not run again
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---------------------------------------------------------------- the data's fingerprint
def image_folder(folder, n=100, seed=0, val=20):
    """A --data folder: n 8x8 uint8 images in 2 classes, and val more as val_images/val_labels."""
    r = numpy.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    numpy.save(folder / "train_images.npy", r.integers(0, 256, (n, 8, 8), dtype="uint8"))
    numpy.save(folder / "train_labels.npy", r.integers(0, 2, n).astype("uint8"))
    numpy.save(folder / "val_images.npy", r.integers(0, 256, (val, 8, 8), dtype="uint8"))
    numpy.save(folder / "val_labels.npy", r.integers(0, 2, val).astype("uint8"))
    return folder


def refused(out, data, changes):
    return (f"gpunet train: cannot resume {out / 'last.safetensors'}: the data of --data {data} changed since the run "
            f"was saved: {changes} (resume with the data the run trained on, or go on with the changed data: "
            "--allow-data-change, in gn.fit allow_data_change=True)")


def test_a_resume_on_changed_data_files_is_refused_naming_the_array(tmp_path, capsys):
    data, out = image_folder(tmp_path / "data"), tmp_path / "run"
    assert cli(TRAIN + ["--steps", "2", "--data", data, "--out", out], capsys)[0] == 0
    images = numpy.load(data / "train_images.npy")
    images[7, 3, 3] ^= 1  # one pixel of one image, at the same path
    numpy.save(data / "train_images.npy", images)
    before = snapshot(out)
    code, _, err = cli(TRAIN + ["--steps", "4", "--data", data, "--out", out, "--resume"], capsys)
    assert code == 1 and one_error_line(err) == refused(
        out, data, "training inputs: other content, same shape (100, 8, 8) and dtype uint8")
    assert snapshot(out) == before


def test_a_resume_on_data_of_another_shape_names_each_change(tmp_path, capsys):
    data, out = image_folder(tmp_path / "data"), tmp_path / "run"
    assert cli(TRAIN + ["--steps", "2", "--data", data, "--out", out], capsys)[0] == 0
    image_folder(data, n=90, seed=1, val=30)  # all four files replaced, at the same paths
    before = snapshot(out)
    code, _, err = cli(TRAIN + ["--steps", "4", "--data", data, "--out", out, "--resume"], capsys)
    assert code == 1 and one_error_line(err) == refused(
        out, data, "training inputs: shape (100, 8, 8) -> (90, 8, 8); training targets: shape (100,) -> (90,); "
                   "validation inputs: shape (20, 8, 8) -> (30, 8, 8); validation targets: shape (20,) -> (30,)")
    assert snapshot(out) == before


def test_allow_data_change_goes_on_says_so_and_saves_the_new_fingerprint(tmp_path, capsys):
    data, out = image_folder(tmp_path / "data"), tmp_path / "run"
    assert cli(TRAIN + ["--steps", "2", "--data", data, "--out", out], capsys)[0] == 0
    labels = numpy.load(data / "val_labels.npy")
    numpy.save(data / "val_labels.npy", 1 - labels)  # other labels at the same path
    code, text, err = cli(TRAIN + ["--steps", "4", "--data", data, "--out", out, "--resume", "--allow-data-change"],
                          capsys)
    assert code == 0 and err == "" and "final: step 4 " in text
    assert (f"resume: going on with changed data, as allowed: the data of --data {data} changed since the run was "
            "saved: validation targets: other content, same shape (20,) and dtype int64") in text.splitlines()
    code, text, err = cli(TRAIN + ["--steps", "6", "--data", data, "--out", out, "--resume"], capsys)
    assert code == 0 and err == "" and "changed data" not in text  # the changed data is the run's data now


def test_allow_data_change_without_resume_is_a_usage_error(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    before = snapshot(tmp_path)
    code, _, err = cli(TRAIN + ["--steps", "2", "--data", data, "--out", tmp_path / "run", "--allow-data-change"],
                       capsys)
    assert code == 2 and one_error_line(err) == ("gpunet train: --allow-data-change lets --resume go on with changed "
                                                 "data; it goes with --resume")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    model = gn.models.mlp((6, 2))
    with pytest.raises(ValueError) as exc:
        gn.fit(model, problem(), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, allow_data_change=True)
    assert str(exc.value) == ("fit: allow_data_change=True lets a resume go on with changed data; it goes with "
                              "resume=True")


def test_fit_refuses_changed_arrays_and_allow_data_change_goes_on(tmp_path):
    x, y = problem()
    train(tmp_path, Data(x, y), steps=2)
    before = snapshot(tmp_path)
    y[0] = 1 - y[0]
    with pytest.raises(ValueError) as exc:
        train(tmp_path, Data(x, y), steps=4, resume=True)
    assert str(exc.value) == (f"cannot resume {tmp_path / 'last.safetensors'}: the data changed since the run was "
                              "saved: training targets: other content, same shape (96,) and dtype int64 (resume with "
                              "the data the run trained on, or go on with the changed data: --allow-data-change, in "
                              "gn.fit allow_data_change=True)")
    assert snapshot(tmp_path) == before
    said = []
    _, _, history = train(tmp_path, Data(x, y), steps=4, resume=True, allow_data_change=True, log=said.append)
    assert said == ["resume: going on with changed data, as allowed: the data changed since the run was saved: "
                    "training targets: other content, same shape (96,) and dtype int64"]
    assert [r["step"] for r in history.records] == [2, 4]


def test_a_run_folder_from_before_the_fingerprint_still_resumes(tmp_path):
    """The fixture is a gn.fit run of 4 steps written by commit ec81085, before data fingerprints:
    mlp (6, 8, 2), SGD lr 0.1, batches of 16, an evaluation every 2 steps, on the data below."""
    fixture = FIXTURES / "before-data-fingerprint"
    kept = snapshot(fixture)
    out = tmp_path / "old"
    shutil.copytree(fixture, out)
    r = numpy.random.default_rng(0)
    x = r.standard_normal((96, 6)).astype("float32")
    y = (x[:, :2].sum(axis=1) > 0).astype("int64")
    gn.manual_seed(0)
    model = gn.models.mlp((6, 8, 2))
    said = []
    history = gn.fit(model, (x, y), (x[:32], y[:32]), optimizer=gn.optim.SGD(model, lr=0.1), steps=8, batch_size=16,
                     eval_every=2, out_dir=out, resume=True, progress=False, log=said.append)
    assert said == [f"resume: {out / 'last.safetensors'} was saved before gpunet kept a fingerprint of the training "
                    "data, so a change of the data cannot be seen; the run goes on (and saves one from now on)"]
    assert [r["step"] for r in history.records] == [2, 4, 6, 8]
    saved = gn.training.checkpoint.read_checkpoint(out / "last.safetensors")[2]["training"]
    assert saved["state"]["step"] == 8
    assert saved["config"]["data_fingerprint"]["training inputs"]["shape"] == [96, 6]
    assert snapshot(fixture) == kept


def test_the_fingerprint_of_100_mb_takes_under_a_second():
    x = numpy.random.default_rng(0).integers(0, 256, (100_000, 1000), dtype="uint8")  # 100 MB
    y = numpy.zeros(100_000, dtype="int64")
    data = gn.train.ArrayData(x, y)
    best = min(_timed(resume.data_fingerprint, data) for _ in range(3))
    assert best < 1.0, f"{best:.2f} s"
    first = resume.data_fingerprint(data)
    x[50_000, 500] ^= 1
    assert resume.data_fingerprint(data)["training inputs"] != first["training inputs"]  # one bit, seen
    assert resume.data_fingerprint(data)["training targets"] == first["training targets"]
    assert resume.data_fingerprint(object()) is None  # a source without arrays: not checked


def _timed(function, *args) -> float:
    begin = time.perf_counter()
    function(*args)
    return time.perf_counter() - begin


# ---------------------------------------------------------------- partial and unwritable run folders
def finished_run(tmp_path, capsys):
    """A run of 2 steps into tmp_path/run; returns it and the TRAIN arguments that resume it to step 4."""
    out, data = tmp_path / "run", image_folder(tmp_path / "data")
    assert cli(TRAIN + ["--data", data, "--steps", "2", "--out", out], capsys)[0] == 0
    return out, TRAIN + ["--data", data, "--steps", "4", "--out", out, "--resume"]


def test_a_last_checkpoint_without_training_metadata_is_refused(tmp_path, capsys):
    out, again = finished_run(tmp_path, capsys)
    shutil.copyfile(out / "model.safetensors", out / "last.safetensors")  # as `cp model last` would leave it
    before = snapshot(out)
    code, _, err = cli(again, capsys)
    assert code == 1 and one_error_line(err) == (f"gpunet train: {out / 'last.safetensors'}: holds no training state "
                                                 "to resume from (is it a model.safetensors?)")
    assert snapshot(out) == before


def test_a_truncated_last_checkpoint_is_refused(tmp_path, capsys):
    out, again = finished_run(tmp_path, capsys)
    whole = (out / "last.safetensors").read_bytes()
    (out / "last.safetensors").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    before = snapshot(out)
    code, _, err = cli(again, capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"gpunet train: {out / 'last.safetensors'}: corrupt or truncated safetensors "
                                         "file (")
    assert snapshot(out) == before


def test_a_folder_with_a_best_model_but_no_last_checkpoint_cannot_resume(tmp_path, capsys):
    out, again = finished_run(tmp_path, capsys)
    (out / "last.safetensors").unlink()
    before = snapshot(out)
    code, _, err = cli(again, capsys)
    assert code == 1 and one_error_line(err) == (
        f"gpunet train: --resume: {out / 'last.safetensors'} does not exist, so there is nothing to resume (the folder "
        "holds model.safetensors, history.json, metrics.csv, history.png)")
    assert snapshot(out) == before


def test_a_lock_left_by_a_process_on_another_machine_does_not_block(tmp_path, capsys):
    """A .lock file with no live flock on it (its process died, or ran on another host over NFS)
    is taken over: the flock, not the file, says a run is live."""
    out, again = finished_run(tmp_path, capsys)
    (out / ".lock").write_text("pid 4242 on another-host since 20260101-000000\n")
    before = snapshot(out)
    code, text, err = cli(again, capsys)
    assert code == 0 and err == "" and "final: step 4 " in text
    assert not (out / ".lock").exists()
    assert set(before) - {".lock"} <= set(snapshot(out))


def test_a_lock_that_is_a_folder_is_one_line_before_any_work(tmp_path, capsys):
    out, again = finished_run(tmp_path, capsys)
    (out / ".lock").mkdir()  # (made by hand, or by a tool that took the name)
    before = snapshot(out)
    code, text, err = cli(again, capsys)
    assert code == 1 and one_error_line(err) == (f"gpunet train: --out {out}: cannot make the run's lock "
                                                 f"({out / '.lock'}: is a folder, not a file)")
    assert "training mlp" not in text and snapshot(out) == before and (out / ".lock").is_dir()


def read_only(monkeypatch, folder):
    """os.open and os.mkdir below folder fail as on a read-only mount (root ignores chmod)."""
    real_open, real_mkdir = os.open, os.mkdir
    inside = str(folder)

    def guarded(real):
        def call(path, *args, **kwargs):
            if os.fspath(path).startswith(inside) and (real is real_mkdir or args[0] & (os.O_WRONLY | os.O_RDWR)):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guarded(real_open))
    monkeypatch.setattr(os, "mkdir", guarded(real_mkdir))


def test_a_run_folder_on_a_read_only_mount_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out, again = finished_run(tmp_path, capsys)
    before = snapshot(out)
    read_only(monkeypatch, out)
    code, text, err = cli(again, capsys)
    assert code == 1 and one_error_line(err) == (
        f"gpunet train: --out {out}: cannot write there (read-only file system); a run writes its lock and "
        "checkpoints in its folder: choose a writable --out (to continue a run kept there, copy its folder and "
        "--resume the copy)")
    assert "training mlp" not in text and snapshot(out) == before


def test_no_run_folder_can_be_made_in_a_read_only_working_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    read_only(monkeypatch, "runs")
    code, _, err = cli(TRAIN + ["--steps", "1"], capsys)
    assert code == 1 and one_error_line(err) == ("gpunet train: cannot make a run folder in runs/ (read-only file "
                                                 "system): run gpunet train from a writable folder, or give --out DIR")
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_resume_goes_on(tmp_path, capsys, monkeypatch):
    """The disk fills after the evaluation at step 6; the one at step 8 cannot save (40 steps)."""
    out, data, calls, seen = tmp_path / "run", image_folder(tmp_path / "data"), [], {}
    get, fdopen = gn.train.ArrayData.get, os.fdopen

    def filling_get(self, indices, rng):
        calls.append(1)
        if len(calls) == 7:
            seen["before"] = run_files(out)  # the evaluation at step 6 wrote these; then the disk is full
        return get(self, indices, rng)

    def full_fdopen(fd, mode="r", *args, **kwargs):
        return FullDisk(fd) if "before" in seen and "w" in mode else fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(gn.train.ArrayData, "get", filling_get)
    monkeypatch.setattr(files.os, "fdopen", full_fdopen)
    code, text, err = cli(TRAIN + ["--data", data, "--steps", "40", "--out", out], capsys)
    # (the validation loss of step 8 is no better than step 6's, so last.safetensors is the first file it writes)
    assert code == 1 and one_error_line(err) == f"gpunet train: {out / 'last.safetensors'}: no space left on the device"
    assert snapshot(out) == seen["before"]  # no half-written file, no temporary, the lock removed
    monkeypatch.undo()  # space freed
    assert saved_step(out / "last.safetensors") == 6
    code, text, _ = cli(TRAIN + ["--data", data, "--steps", "40", "--out", out, "--resume"], capsys)
    assert code == 0 and "(resumed)" in text and "final: step 40 " in text
