"""Issue 13, part 1: no run is ever lost. Fresh run folders, runs/latest, the refusal of a folder
that holds a run, --overwrite moving it aside, the lock against a second run, stale temporaries."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.training import runs
from tests.support.reliability import cli, one_error_line, snapshot

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--steps", "2", "--device", "cpu", "--no-progress"]


def test_readme_command_can_run_again_and_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(TRAIN, capsys)[0] == 0
    first = (tmp_path / "runs" / "latest").resolve()
    before = snapshot(first)
    code, out, _ = cli(TRAIN, capsys)
    assert code == 0
    second = (tmp_path / "runs" / "latest").resolve()
    assert second != first and second.parent == first.parent
    assert (tmp_path / "runs" / "latest").is_symlink()
    assert snapshot(first) == before  # the first run is untouched
    assert f"wrote {Path('runs') / second.name / 'model.safetensors'}" in out
    assert {p.name for p in second.iterdir()} == {"model.safetensors", "last.safetensors", "history.json",
                                                   "metrics.csv", "history.png"}


def test_an_old_runs_latest_folder_is_moved_aside_not_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs" / "latest"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"an older gpunet's run")
    before = snapshot(old)
    code, out, _ = cli(TRAIN, capsys)
    assert code == 0 and "moved the earlier runs/latest (a folder, not a link) to runs/latest-before-" in out
    moved = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("latest-before-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before
    assert (tmp_path / "runs" / "latest").is_symlink()


@pytest.mark.parametrize("out", ["runs/latest", "explicit"])
def test_a_folder_holding_a_run_is_refused(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    if out == "runs/latest":
        assert cli(TRAIN, capsys)[0] == 0
    else:
        assert cli(TRAIN + ["--out", out], capsys)[0] == 0
    folder = Path(out).resolve()
    before = snapshot(folder)
    code, _, err = cli(TRAIN + ["--out", out, "--lr", "0.5"], capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"gpunet train: {out} already holds a run (model.safetensors")
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(folder) == before


def test_an_empty_folder_is_fine(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(TRAIN + ["--out", str(tmp_path / "empty")], capsys)[0] == 0
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(TRAIN + ["--out", str(out)], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, text, _ = cli(TRAIN + ["--out", str(out), "--overwrite", "--seed", "1"], capsys)
    assert code == 0 and f"moved the earlier run in {out} to {out}/replaced-" in text
    aside = next(out.glob("replaced-*"))
    for name, content in before.items():
        if name == "notes.txt":
            assert snapshot(out)["notes.txt"] == content  # not a run file: left where it was
        else:
            assert snapshot(aside)[name] == content
    assert (out / "model.safetensors").exists()


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path, capsys):
    code, _, err = cli(TRAIN + ["--out", str(tmp_path), "--resume", "--overwrite"], capsys)
    assert code == 2 and "give one of them" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_run_names_the_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(TRAIN + ["--resume"], capsys)
    assert code == 1 and "--resume without --out continues runs/latest, and there is no such run" in one_error_line(err)
    code, _, err = cli(TRAIN + ["--resume", "--out", "nothing-here"], capsys)
    assert code == 1 and "nothing-here/last.safetensors does not exist" in one_error_line(err)
    code, _, err = cli(TRAIN + ["--resume", "--out", "a/b/c"], capsys)
    assert code == 1 and "a/b/c/last.safetensors does not exist" in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == []  # no folder left behind, not even a parent it made


def test_a_failed_resume_keeps_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    code, _, _ = cli(TRAIN + ["--resume", "--out", tmp_path / "mine"], capsys)
    assert code == 1 and (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "cache"))
    code, _, err = cli(["train", "--dataset", "mnist", "--device", "cpu", "--steps", "1"], capsys)
    assert code == 1 and "Run with --download" in one_error_line(err)
    assert not (tmp_path / "runs" / "latest").exists() and list((tmp_path / "runs").iterdir()) == []


def fit(out, log=None, lr=0.1, **kw):
    """A small fit into out (lr=1e30 makes it diverge before its first evaluation)."""
    r = numpy.random.default_rng(0)
    x = r.standard_normal((64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    gn.manual_seed(0)
    model = gn.models.mlp((6, 8, 2))
    data = (x, y)
    with numpy.errstate(all="ignore"):
        return gn.fit(model, data, (x[:16], y[:16]), optimizer=gn.optim.SGD(model, lr=lr), steps=4, batch_size=16,
                      eval_every=2, out_dir=out, progress=False, log=log or (lambda *a: None), **kw)


@pytest.mark.parametrize("second", ["diverges", "improves"])
def test_fit_refuses_a_folder_that_holds_a_run_and_changes_nothing(tmp_path, second):
    fit(tmp_path)
    before = snapshot(tmp_path)
    assert {"history.json", "model.safetensors", "last.safetensors"} <= set(before)
    with pytest.raises(runs.RunExists) as exc:
        fit(tmp_path, lr=1e30 if second == "diverges" else 0.2)
    assert str(exc.value) == (f"{tmp_path} already holds a run (model.safetensors, last.safetensors, history.json, "
                              "metrics.csv, history.png); continue it with resume=True, move it aside with "
                              "overwrite=True, or choose another out_dir")
    assert snapshot(tmp_path) == before  # history.json and the best model of the first run included


def test_fit_overwrite_moves_the_earlier_run_aside(tmp_path):
    fit(tmp_path)
    before = snapshot(tmp_path)
    said = []
    with pytest.raises(gn.TrainingDiverged, match="no checkpoint was saved"):
        fit(tmp_path, lr=1e30, overwrite=True, log=said.append)
    aside = next(tmp_path.glob("replaced-*"))
    assert said == [f"moved the earlier run in {tmp_path} to {aside}"]
    assert snapshot(aside) == before  # nothing of the earlier run lost
    with pytest.raises(ValueError, match="fit: resume=True continues the run in out_dir and overwrite=True moves it "
                                         "aside; give one of them"):
        fit(tmp_path, resume=True, overwrite=True)


def test_fit_resume_into_a_missing_folder_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resume=True: .*new/last.safetensors does not exist, so there is "
                                                r"nothing to resume"):
        fit(tmp_path / "new", resume=True)
    assert list(tmp_path.iterdir()) == []


HOLD_LOCK = ("import sys; from gpunet.training.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); sys.stdin.read()")


def _hold_lock(folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = _hold_lock(out)
    try:
        code, _, err = cli(TRAIN + ["--out", str(out)], capsys)
        line = one_error_line(err)
        assert code == 1 and f"{out} is in use by another training run (pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait()
    assert cli(TRAIN + ["--out", str(out)], capsys)[0] == 0  # the lock ended with its process
    assert not (out / ".lock").exists()  # and this run removed its own on the way out


def test_kill_9_releases_the_lock_and_the_next_run_cleans_stale_temporaries(tmp_path, capsys):
    out = tmp_path / "dead"
    holder = _hold_lock(out)
    (out / ".model.safetensors.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (out / ".my-own.tmp").write_text("not ours")  # not a temporary of gpunet: kept
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, text, _ = cli(TRAIN + ["--out", str(out)], capsys)
    assert code == 0 and f"removed 1 temporary file(s) an interrupted run left in {out}" in text
    assert not (out / ".model.safetensors.0123abcd.tmp").exists() and (out / ".my-own.tmp").read_text() == "not ours"


def test_lock_is_taken_once_even_in_one_process_and_released(tmp_path):
    lock = runs.RunLock(tmp_path).acquire()  # the run's setup opens its folder once: no re-entrant lock table
    with pytest.raises(runs.RunLocked, match="is in use by another training run"):
        runs.RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").exists()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    runs.RunLock(tmp_path).acquire().release()  # free again


@pytest.mark.parametrize("bad, message", [
    ("file", "is a file, not a folder"),
    ("file/sub", "is a file, not a folder"),
])
def test_a_bad_out_is_refused_before_any_work(tmp_path, capsys, bad, message):
    (tmp_path / "file").write_text("keep me")
    before = snapshot(tmp_path)
    code, out, err = cli(TRAIN + ["--out", str(tmp_path / bad)], capsys)
    assert code == 1 and message in one_error_line(err) and str(tmp_path / "file") in one_error_line(err)
    assert "training mlp" not in out  # refused before the data was loaded
    assert snapshot(tmp_path) == before


def test_unicode_and_undecodable_folder_names(tmp_path, capsys):
    for name in ("résumé 日本 🚀", os.fsdecode(b"run-\xff")):
        out = tmp_path / name
        code, text, _ = cli(TRAIN + ["--out", str(out)], capsys)
        assert code == 0 and (out / "model.safetensors").exists()
        code, _, err = cli(TRAIN + ["--out", str(out)], capsys)
        assert code == 1 and "already holds a run" in one_error_line(err)


def test_main_via_python_m_prints_one_line_and_exit_code(tmp_path):
    (tmp_path / "f").write_text("x")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, "-m", "gpunet", *TRAIN, "--out", str(tmp_path / "f")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == f"gpunet train: --out {tmp_path / 'f'} is a file, not a folder"


def test_an_empty_out_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["train", "--out", "", "--steps", "1"], capsys)
    assert code != 0 and "--out is empty; give a folder" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []  # nothing made, "." not taken for the folder
