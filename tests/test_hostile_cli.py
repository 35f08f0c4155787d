"""Issue 26, hostile inputs of the second round: search spaces out of range, a search folder in use,
devices and FIFOs given as files, an unbounded `generate --length`, edited checkpoints, gn.save into
a folder, NUMBA_NUM_THREADS=0 and the tiny benchmarks. Each case: the exact one line, the exit
status, and every file that existed before keeps its bytes (snapshot before and after)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import gpunet as gn
from gpunet import files, generate as generating, validate
from gpunet.backend import cpu_kernels
from gpunet.benchmarks import REPEATS, TINY_REPEATS, report as bench_report, runner as bench_runner
from gpunet.search import space as spaces, study
from tests.support.reliability import cli, one_error_line, snapshot

SEARCH = ["search", "--model", "mlp", "--steps", "2", "--device", "cpu", "--trials", "1"]
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def mlp_checkpoint(path: Path) -> Path:
    """A 4-3-2 classifier of 2x2 images, with its preprocessing, saved at path."""
    gn.manual_seed(0)
    model = gn.models.mlp((4, 3, 2))
    model.preprocess = {"kind": "image", "scale": 1 / 255, "mean": 0.1, "std": 0.3, "shape": [4]}
    gn.save(model, path)
    return path


def char_checkpoint(path: Path) -> Path:
    gn.manual_seed(0)
    model = gn.models.char_rnn(3, 4, 8)
    model.preprocess = gn.data.text_preprocess("abc")
    gn.save(model, path)
    return path


def edited(source: Path, target: Path, tensors=None, metadata=None) -> Path:
    """A copy of the checkpoint source with its tensors and/or metadata edited (checksums kept as saved,
    or dropped by the edit)."""
    weights = load_file(source)
    with safe_open(source, "numpy") as f:
        meta = dict(f.metadata())
    save_file(tensors(weights) if tensors else weights, target, metadata=metadata(meta) if metadata else meta)
    return target


def with_architecture(change):
    def edit(meta):
        arch = json.loads(meta["architecture"])
        change(arch)
        return {**meta, "architecture": json.dumps(arch)}
    return edit


def without_checksums(meta):
    return {k: v for k, v in meta.items() if k != "checksums"}


def fifo(path: Path) -> Path:
    """A named pipe at path; a watchdog opens it for writing after 30 s, so a reader that wrongly
    opened it gets end-of-file instead of hanging the suite."""
    os.mkfifo(path)

    def release():
        time.sleep(30)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
    threading.Thread(target=release, daemon=True).start()
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def refused(argv, capsys, folder, code=1) -> str:
    """Run gpunet argv; assert its exit status, no traceback, and that nothing in folder changed."""
    before = snapshot(folder)
    got, _, err = cli(argv, capsys)
    line = one_error_line(err)
    assert got == code, err
    assert snapshot(folder) == before
    return line


# ---------------------------------------------------------------- 1. search spaces, checked in full
@pytest.mark.parametrize("space, message", [
    ({"dropout": 1.5}, "'dropout': must be a dropout rate in [0, 1), got 1.5"),
    ({"dropout": {"low": 0.0, "high": 1.0}}, "'dropout': must be a dropout rate in [0, 1), got 1.0"),
    ({"batch_size": 0}, "'batch_size': must be a batch size from 1 to 65536, got 0"),
    ({"batch_size": {"choices": [32, 0]}}, "'batch_size': must be a batch size from 1 to 65536, got 0"),
    ({"lr": -0.01}, "'lr': must be a positive learning rate, got -0.01"),
    ({"lr": 0}, "'lr': must be a positive learning rate, got 0"),  # the recipe's lr would have run silently
    ({"warmup": 1.5}, "'warmup': must be a fraction of the run from 0 to 1, got 1.5"),
    ({"shift": 100}, "'shift': must be a shift from 0 to 27 pixels, got 100"),
    ({"hidden1": 10**9}, "'hidden1': must be a size from 1 to 16384, got 1000000000"),
    ({"hidden2": 0}, "'hidden2': must be a size from 1 to 16384, got 0"),
    ({"lr": "0.01"}, "'lr': expected a number, {\"low\", \"high\"[, \"log\"]} or {\"choices\"}, got '0.01'"),
    ({"lr": True}, "'lr': expected a number, {\"low\", \"high\"[, \"log\"]} or {\"choices\"}, got True"),
    ({"lr": {"low": 1e-3, "hi": 1e-2}}, "'lr': expected the keys low, high and optional log, or choices; got hi, low"),
    ({"learning_rate": 0.01}, "unknown parameter 'learning_rate' for --model mlp (known: lr, batch_size, "
                              "weight_decay, warmup, momentum, shift, hidden1, hidden2, dropout)"),
])
def test_a_space_value_out_of_range_is_refused_before_anything_is_written(space, message, tmp_path, capsys):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    out = tmp_path / "s"
    line = refused([*SEARCH, "--space", path, "--out", out], capsys, tmp_path)
    assert line == f"gpunet search: space file {path}: {message}"
    assert not out.exists()  # no study.db: the corrected file runs in the same --out


def test_the_transformers_d_model_must_split_among_its_heads(tmp_path, capsys):
    path = tmp_path / "space.json"
    path.write_text('{"d_model": {"choices": [64, 66]}}')
    argv = ["search", "--model", "transformer", "--steps", "2", "--device", "cpu", "--trials", "1", "--space", path,
            "--out", tmp_path / "s"]
    assert refused(argv, capsys, tmp_path) == (f"gpunet search: space file {path}: 'd_model': must be a multiple of 4 "
                                               "(the attention heads), got 66")
    path.write_text('{"d_model": {"low": 64, "high": 128}}')
    assert refused(argv, capsys, tmp_path) == (f"gpunet search: space file {path}: 'd_model': a range would draw "
                                               "values that are not multiples of 4; give choices or a fixed value")


def test_after_a_refused_space_the_corrected_file_searches_in_the_same_folder(tmp_path, capsys):
    path, out = tmp_path / "space.json", tmp_path / "s"
    path.write_text('{"dropout": 1.5, "hidden1": 8, "hidden2": 4}')
    refused([*SEARCH, "--space", path, "--out", out], capsys, tmp_path)
    path.write_text('{"dropout": 0.5, "hidden1": 8, "hidden2": 4}')
    code, text, err = cli([*SEARCH, "--space", path, "--out", out], capsys)
    assert code == 0, err
    assert (out / "study.db").exists() and (out / "trials" / "trial-000" / "model.safetensors").exists()
    assert "trial 0 (1/1): dropout=0.5 hidden1=8 hidden2=4 -> val_loss" in text


def test_a_space_given_from_python_is_checked_as_a_file_is(tmp_path):
    with pytest.raises(ValueError) as exc:
        study.search(gn.recipes.recipe("mlp"), "mlp", 1, tmp_path / "s", steps=2, space={"dropout": 1.5},
                     device=gn.device("cpu"), log=lambda line: None)
    assert str(exc.value) == "space: 'dropout': must be a dropout rate in [0, 1), got 1.5"
    assert list(tmp_path.iterdir()) == []


def test_a_search_whose_data_cannot_load_leaves_no_folder_and_no_study(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    out = tmp_path / "s"
    line = refused([*SEARCH, "--dataset", "mnist", "--data-dir", tmp_path / "data", "--out", out], capsys, tmp_path)
    assert line == (f"gpunet search: MNIST file {tmp_path}/data/mnist/train-images-idx3-ubyte.gz is missing. Run with "
                    f"--download (or download=True) to fetch the official files into {tmp_path}/data/mnist, or set "
                    "GPUNET_DATA / --data-dir to where they are.")
    assert not out.exists()


# ---------------------------------------------------------------- 2. one search at a time in a folder
def test_a_second_search_on_a_folder_in_use_is_refused_as_in_use(tmp_path, capsys):
    """The first search locks its folder before it writes anything: a second search started 0.5 s after
    it, before its study.db exists, hears "in use", not "holds files but no search"."""
    out = tmp_path / "s"
    holder = subprocess.Popen(  # what the first search holds from its start: the folder's lock
        [sys.executable, "-c", "import sys, time; from gpunet.training.runs import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = (out / ".lock").read_text().strip()
        assert owner.startswith(f"pid {holder.pid} on ")
        line = refused([*SEARCH, "--out", out], capsys, tmp_path)
        assert line == (f"gpunet search: {out} is in use by another training run ({owner}); wait for it to end or "
                        "choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no study.db of the refused search
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_of_other_files_is_still_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "a.txt").write_text("mine")
    line = refused([*SEARCH, "--out", out], capsys, tmp_path)
    assert line == f"gpunet search: --out {out} holds files but no search (no study.db); choose a new or empty folder"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the lock it took is gone again


# ---------------------------------------------------------------- 3. devices, FIFOs and folders as files
SPECIAL = "not a regular file; gpunet reads only regular files"


def test_data_dev_zero_is_refused_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(["train", "--model", "rnn", "--data", "/dev/zero", "--steps", "1", "--device", "cpu", "--out",
                    tmp_path / "run"], capsys, tmp_path)
    assert line == f"gpunet train: --data /dev/zero is a character device, {SPECIAL}"
    assert list(tmp_path.iterdir()) == []  # the run folder made for it is removed again


def test_a_fifo_among_the_image_files_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    numpy.save(data / "train_labels.npy", numpy.arange(8) % 2)
    fifo(data / "train_images.npy")
    line = refused(["train", "--data", data, "--steps", "1", "--device", "cpu", "--out", tmp_path / "run"], capsys,
                   tmp_path)
    assert line == f"gpunet train: {data / 'train_images.npy'} is a named pipe (FIFO), {SPECIAL}"
    assert not (tmp_path / "run").exists()


def test_a_text_file_that_is_a_fifo_is_refused(tmp_path, capsys):
    text = fifo(tmp_path / "book.txt")
    line = refused(["train", "--model", "rnn", "--data", text, "--steps", "1", "--device", "cpu", "--out",
                    tmp_path / "run"], capsys, tmp_path)
    assert line == f"gpunet train: --data {text} is a named pipe (FIFO), {SPECIAL}"


@pytest.mark.parametrize("command", ["eval", "predict", "generate"])
def test_a_checkpoint_that_is_a_device_or_fifo_is_refused(command, tmp_path, capsys):
    images = tmp_path / "i.idx"
    gn.data.write_idx(images, numpy.zeros((2, 2, 2), "uint8"))
    extra = {"eval": ["--images", images, "--labels", images], "predict": ["--images", images], "generate": []}
    for checkpoint, kind in (("/dev/zero", "a character device"), (fifo(tmp_path / "m.safetensors"),
                                                                    "a named pipe (FIFO)")):
        line = refused([command, checkpoint, *extra[command], "--device", "cpu"], capsys, tmp_path)
        assert line == f"gpunet {command}: {checkpoint} is {kind}, {SPECIAL}"


def test_eval_and_predict_inputs_that_are_devices_or_fifos_are_refused(tmp_path, capsys):
    model = mlp_checkpoint(tmp_path / "m.safetensors")
    labels = tmp_path / "l.idx"
    gn.data.write_idx(labels, numpy.zeros(2, "uint8"))
    pipe = fifo(tmp_path / "images.npy")
    assert refused(["eval", model, "--images", "/dev/zero", "--labels", labels, "--device", "cpu"], capsys,
                   tmp_path) == f"gpunet eval: --images /dev/zero is a character device, {SPECIAL}"
    assert refused(["eval", model, "--images", labels, "--labels", pipe, "--device", "cpu"], capsys,
                   tmp_path) == f"gpunet eval: --labels {pipe} is a named pipe (FIFO), {SPECIAL}"
    assert refused(["predict", model, "--images", pipe, "--device", "cpu"], capsys,
                   tmp_path) == f"gpunet predict: {pipe} is a named pipe (FIFO), {SPECIAL}"


def test_a_resume_whose_last_checkpoint_is_a_fifo_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    last = fifo(out / "last.safetensors")
    line = refused(["train", "--resume", "--out", out, "--steps", "1", "--device", "cpu"], capsys, tmp_path)
    assert line == f"gpunet train: {last} is a named pipe (FIFO), {SPECIAL}"


@pytest.mark.parametrize("make, message", [
    (lambda p: Path("/dev/zero"), "space file /dev/zero is a character device, " + SPECIAL),
    (lambda p: fifo(p / "space.json"), "space file {p}/space.json is a named pipe (FIFO), " + SPECIAL),
    (lambda p: (p / "space.json").mkdir() or p / "space.json", "{p}/space.json: is a folder, not a file"),
    (lambda p: written(p / "space.json", b"\x80{}"),
     "space file {p}/space.json: not valid JSON ('utf-8' codec can't decode byte 0x80 in position 0: invalid start "
     "byte)"),
    (lambda p: written(p / "space.json", b"[1, 2]"),
     "space file {p}/space.json: expected a table of parameter name -> range, choices or value"),
    (lambda p: written(p / "space.json", b'{"lr": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
     "space file {p}/space.json: not valid JSON (maximum recursion depth exceeded while decoding a JSON array from "
     "a unicode string)"),
])
def test_a_space_file_that_is_no_file_or_no_table_is_refused(make, message, tmp_path, capsys):
    path = make(tmp_path)
    line = refused([*SEARCH, "--space", path, "--out", tmp_path / "s"], capsys, tmp_path)
    assert line == "gpunet search: " + message.format(p=tmp_path)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- 4. generate: capped, streamed
def test_generate_refuses_a_length_above_its_cap(tmp_path, capsys):
    model = char_checkpoint(tmp_path / "m.safetensors")
    line = refused(["generate", model, "--length", "100000000000"], capsys, tmp_path, code=2)
    assert line == ("gpunet generate: argument --length: must be a non-negative integer up to 1_000_000, got "
                    "'100000000000' "
                    "(usage: gpunet generate --help)")
    with pytest.raises(ValueError) as exc:
        generating.generate(gn.load(model), "ab", length=generating.MAX_LENGTH + 1)
    assert str(exc.value) == "generate: length must be at most 1000000, got 1000001"


def test_generate_streams_its_text_in_pieces_and_prints_them_as_they_come(tmp_path, capsys, monkeypatch):
    path = char_checkpoint(tmp_path / "m.safetensors")
    model = gn.load(path)
    pieces = list(generating.stream(model, "ab", length=130, seed=3))
    assert [len(p) for p in pieces] == [66, 64, 2] and pieces[0].startswith("ab")  # the prompt with the first 64
    assert "".join(pieces) == generating.generate(model, "ab", length=130, seed=3)
    printed = []
    real_print = print

    def recording_print(*args, **kwargs):  # each piece goes out flushed, before the next is sampled
        printed.append((args, kwargs.get("end"), kwargs.get("flush")))
        real_print(*args, **kwargs)

    monkeypatch.setattr("builtins.print", recording_print)
    code, text, err = cli(["generate", path, "--prompt", "ab", "--length", "130", "--seed", "3", "--device", "cpu"],
                          capsys)
    assert code == 0 and text == "".join(pieces) + "\n"
    assert [(args[0], end, flush) for args, end, flush in printed[-4:-1]] == [(p, "", True) for p in pieces]


# ---------------------------------------------------------------- 5. edited checkpoints
def test_an_architecture_of_exabytes_is_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    source = mlp_checkpoint(tmp_path / "m.safetensors")
    huge = edited(source, tmp_path / "huge.safetensors", metadata=with_architecture(
        lambda a: a["layers"][0]["args"].update(in_features=10**9, out_features=10**9)))
    built = []
    monkeypatch.setattr(gn.training.checkpoint, "build_layer", lambda config: built.append(config))
    numpy.save(tmp_path / "x.npy", numpy.zeros((1, 4), "uint8"))
    line = refused(["predict", huge, "--images", tmp_path / "x.npy", "--device", "cpu"], capsys, tmp_path)
    assert line == (f"gpunet predict: {huge}: layer 0 (Dense): its architecture names the size 1000000000, more than "
                    "the 15 values of its tensors in the file allow; the architecture does not match the weights (the "
                    "file was edited or damaged)")
    assert built == []  # refused before the model was built


def test_a_layer_whose_tensors_were_removed_is_measured_against_the_whole_file(tmp_path):
    source = mlp_checkpoint(tmp_path / "m.safetensors")

    def drop_first_layer(weights):
        return {k: v for k, v in weights.items() if not k.startswith("0.")}

    path = edited(source, tmp_path / "e.safetensors", tensors=drop_first_layer, metadata=lambda meta: with_architecture(
        lambda a: a["layers"][0]["args"].update(in_features=4096, out_features=4096))(without_checksums(meta)))
    with pytest.raises(ValueError) as exc:
        gn.load(path)
    assert str(exc.value) == (f"{path}: layer 0 (Dense): its architecture names the sizes 4096, 4096, more than the 8 "
                              "values of all tensors in the file allow; the architecture does not match the weights "
                              "(the file was edited or damaged)")


@pytest.mark.parametrize("edit, message", [
    (lambda w: {k: v for k, v in w.items() if k != "0.bias"},
     "checkpoint does not match its architecture: Sequential: state_dict mismatch; missing ['0.bias'], unexpected []"),
    (lambda w: {**w, "9.weight": numpy.zeros(3, "float32")},
     "checkpoint does not match its architecture: Sequential: state_dict mismatch; missing [], unexpected "
     "['9.weight']"),
    (lambda w: {**w, "0.weight": w["0.weight"].astype("int8")},
     "tensor '0.weight' holds int8 values, but the layer keeps float32; the file was edited or damaged"),
])
def test_missing_extra_and_wrong_dtype_tensors_are_refused_naming_them(edit, message, tmp_path, capsys):
    source = mlp_checkpoint(tmp_path / "m.safetensors")
    path = edited(source, tmp_path / "e.safetensors", tensors=edit, metadata=without_checksums)
    numpy.save(tmp_path / "x.npy", numpy.zeros((1, 4), "uint8"))
    line = refused(["predict", path, "--images", tmp_path / "x.npy", "--device", "cpu"], capsys, tmp_path)
    assert line == f"gpunet predict: {path}: {message}"


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    source = mlp_checkpoint(tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[:-10])
    line = refused(["generate", cut, "--device", "cpu"], capsys, tmp_path)
    assert line == (f"gpunet generate: {cut}: corrupt or truncated safetensors file (Error while deserializing: "
                    "incomplete metadata, file not fully covered)")


@pytest.mark.parametrize("spec, message", [
    ({"scale": "0.5"}, "'scale' must be a finite number, got '0.5'"),
    ({"std": 0}, "'std' must be positive, got 0"),
    ({"mean": None}, "'mean' must be a finite number, got None"),
    ({"shape": [2, "2"]}, "'shape' must be a list of positive whole numbers, got [2, '2']"),
    ({"kind": "video"}, "kind must be one of image, text, got 'video'"),
])
def test_a_preprocessing_value_of_the_wrong_type_is_refused_naming_the_file(spec, message, tmp_path, capsys):
    source = mlp_checkpoint(tmp_path / "m.safetensors")

    def edit(meta):
        return {**meta, "preprocess": json.dumps({**json.loads(meta["preprocess"]), **spec})}

    path = edited(source, tmp_path / "e.safetensors", metadata=edit)
    numpy.save(tmp_path / "x.npy", numpy.zeros((1, 4), "uint8"))
    line = refused(["predict", path, "--images", tmp_path / "x.npy", "--device", "cpu"], capsys, tmp_path)
    assert line == f"gpunet predict: {path}: preprocessing: {message}"


def test_a_text_vocabulary_that_is_not_text_is_refused(tmp_path, capsys):
    source = char_checkpoint(tmp_path / "m.safetensors")
    path = edited(source, tmp_path / "e.safetensors", metadata=lambda meta: {
        **meta, "preprocess": json.dumps({"kind": "text", "vocabulary": ["a", "b", "c"]})})
    line = refused(["generate", path, "--device", "cpu"], capsys, tmp_path)
    assert line == (f"gpunet generate: {path}: preprocessing: 'vocabulary' must be a non-empty string of distinct "
                    "characters, got ['a', 'b', 'c']")


def test_metadata_nested_too_deeply_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    source = char_checkpoint(tmp_path / "m.safetensors")
    deep = edited(source, tmp_path / "deep.safetensors", metadata=lambda meta: {
        **meta, "architecture": '{"type": "Sequential", "layers": ' + "[" * 100000 + "]" * 100000 + "}"})
    assert refused(["generate", deep, "--device", "cpu"], capsys, tmp_path) == (
        f"gpunet generate: {deep}: corrupt checkpoint metadata (maximum recursion depth exceeded while decoding a "
        "JSON array from a unicode string)")

    def too_deep(config):  # what building Sequentials nested a few hundred deep ends in
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(gn.training.checkpoint, "build_layer", too_deep)
    assert refused(["generate", source, "--device", "cpu"], capsys, tmp_path) == (
        f"gpunet generate: {source}: checkpoint does not match its architecture: layers nested too deeply to build")


def test_every_model_the_library_builds_passes_the_size_check():
    """The size check must never refuse a file that matches its architecture (no false alarms)."""
    L = gn.layers
    models = [gn.models.mlp((784, 300, 100, 10)), gn.models.wide_cnn(10, width=8, dropout=0.1, conv_bias=False),
              gn.models.char_rnn(65, embedding_dim=64, hidden_size=384), gn.models.char_rnn(65, 8, 4, cell="gru"),
              gn.models.transformer(65, context=64, d_model=128, num_heads=4, num_layers=2),
              gn.Sequential(L.Conv2D(3, 2, 7, stride=9, padding=3, bias=False), L.MaxPool2D(3)),
              gn.Sequential(L.Conv1D(2, 3, 5, padding=2), L.MultiHeadAttention(8, 8)), L.Dense(3, 2)]
    for model in models:
        gn.training.checkpoint.check_sizes("m", model.to_config(), {k: gn.to_numpy(v) for k, v in model.state_dict().items()})


# ---------------------------------------------------------------- 6. gn.save into a folder
def test_save_into_an_existing_folder_is_one_line_and_leaves_nothing(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(IsADirectoryError) as exc:
        gn.save(gn.models.mlp((4, 2)), folder)
    assert str(exc.value) == f"gn.save: {folder} is a folder; give a file path such as {folder / 'model.safetensors'}"
    assert snapshot(tmp_path) == before and sorted(os.listdir(folder)) == ["keep.txt"]  # no temporary
    with pytest.raises(IsADirectoryError) as exc:  # every atomic write refuses a folder before its temporary
        files.atomic_write(folder, b"x")
    assert str(exc.value) == f"{folder} is a folder, not a file; give the path of a file to write"
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 7. NUMBA_NUM_THREADS
@pytest.mark.parametrize("value", ["0", "-2", "abc", ""])
def test_numba_num_threads_out_of_range_is_named(value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NUMBA_NUM_THREADS", value)
    line = refused(["info"], capsys, tmp_path)
    message = (f"environment variable NUMBA_NUM_THREADS={value!r} must be a whole number of at least 1 (Numba's "
               "worker threads; unset it for one per CPU core)")
    assert line == "gpunet info: " + message
    with pytest.raises(ValueError) as exc:  # from Python: at the first use of a Numba kernel
        cpu_kernels.numba_module()
    assert str(exc.value) == message


def test_numba_num_threads_zero_in_a_fresh_process_is_one_line(tmp_path):
    """Numba itself fails at import with 0 ("Number of threads specified must be > 0"): gpunet checks first."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "0", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", "--steps", "1", "--device", "cpu", "--out",
                           tmp_path / "run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert one_error_line(done.stderr) == ("gpunet train: environment variable NUMBA_NUM_THREADS='0' must be a whole "
                                           "number of at least 1 (Numba's worker threads; unset it for one per CPU "
                                           "core)")
    assert list(tmp_path.iterdir()) == []
    assert validate.numba_threads({"NUMBA_NUM_THREADS": "4"}) is None


# ---------------------------------------------------------------- 8. the tiny benchmarks say what they are
def test_tiny_benchmarks_are_named_by_their_sizes_and_called_a_smoke_test(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, err = cli(["bench", "--tiny", "--device", "cpu", "--only", "lstm,mlp,im2col"], capsys)
    assert code == 0, err
    rows = [line.split()[0] for line in text.splitlines() if line.startswith(("lstm", "mlp", "im2col"))]
    assert rows == ["im2col-b4-c2-6px-k5", "mlp-784-300-100-10-b4", "lstm-lm-b4-t8-h16"]
    assert bench_report.TINY_NOTE in text.splitlines()
    assert list(tmp_path.iterdir()) == []
    code, text, _ = cli(["bench", "--help"], capsys)
    assert code == 0 and "timed rounds per side (default 5; 3 with --tiny)" in " ".join(text.split())
    assert (REPEATS, TINY_REPEATS) == (5, 3) and bench_runner.REPEATS is REPEATS


def test_a_bench_report_path_that_is_a_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.json").write_text("{}")
    monkeypatch.setattr(bench_runner, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    line = refused(["bench", "--tiny", "--device", "cpu", "--json", tmp_path / "out"], capsys, tmp_path, code=2)
    assert line == f"gpunet bench: --json {tmp_path / 'out'} is a folder; give the name of a file to write"
