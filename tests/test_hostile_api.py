"""Issue 26, items 2 and 3: hostile inputs of gn.fit, gn.evaluate, model.predict and gpunet train /
eval / predict that reached NumPy unchecked or did nothing silently. Each case asserts the exact
one-line message and that nothing the user had (weights, data files, run folders) changed."""
from __future__ import annotations

import re

import numpy
import pytest

import gpunet as gn
from gpunet.backend.numpy_ops import NumpyOps
from tests.support.reliability import cli, one_error_line, snapshot


def data(n=16, features=4, classes=3, seed=0):
    r = numpy.random.default_rng(seed)
    return r.random((n, features)).astype("float32"), (numpy.arange(n) % classes).astype("int64")


def weights(model):
    return {k: numpy.array(v) for k, v in model.params.items()}


def same_weights(model, before) -> bool:
    return all(numpy.array_equal(model.params[k], v) for k, v in before.items())


def fit(model, train, val=None, optimizer=None, **kw):
    opt = optimizer if optimizer is not None else gn.optim.SGD(model, lr=0.1)
    return gn.fit(model, train, val, optimizer=opt, progress=False, log=lambda *a: None, **{"steps": 2, **kw})


def raises(exc_type, message):
    return pytest.raises(exc_type, match="^" + re.escape(message) + "$")


def real_memory_error():
    """NumPy's own out-of-memory exception (numpy._core._exceptions._ArrayMemoryError), from a real
    allocation of 4 EiB: more than any address space, so it fails at once whatever the overcommit."""
    try:
        numpy.empty(2**62, dtype=numpy.uint8)
    except MemoryError as exc:
        return exc
    raise AssertionError("allocating 4 EiB succeeded")


def image_folder(folder, x, y):
    folder.mkdir()
    numpy.save(folder / "train_images.npy", x)
    numpy.save(folder / "train_labels.npy", y)
    return folder


# ---------------------------------------------------------------- 1. the optimizer of another model
def test_fit_refuses_an_optimizer_made_with_another_model(tmp_path):
    model, other = gn.models.mlp((4, 8, 3)), gn.models.mlp((4, 8, 3))
    keep = tmp_path / "run"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    before, files = weights(model), snapshot(keep)
    with raises(ValueError, "fit: the optimizer (Adam) was made with another model: it updates 4 parameters "
                            "(0.weight, 0.bias, 2.weight, ... (1 more)) of a Sequential, and none of them belong to "
                            "the Sequential being fitted (4 parameters: 0.weight, 0.bias, 2.weight, ... (1 more)); "
                            "make it with the model you fit, gn.optim.Adam(model, ...); to train only a part, make it "
                            "with the whole model and freeze the rest (layer.freeze()), or give that part "
                            "its own learning rate with parameter groups (groups={pattern: {\"lr\": ...}})"):
        fit(model, data(), optimizer=gn.optim.Adam(other), out_dir=keep, overwrite=True)
    assert same_weights(model, before) and snapshot(keep) == files


def test_fit_refuses_an_optimizer_made_with_a_part_of_the_model():
    model = gn.models.mlp((4, 8, 3))
    before = weights(model)
    with raises(ValueError, "fit: the optimizer (SGD) was made with a part of the model being fitted: it updates 2 "
                            "of its 4 parameters (0.weight, 0.bias), so 2 (2.weight, 2.bias) would never train; "
                            "make it with the model you fit, gn.optim.SGD(model, ...); to train only a part, make it "
                            "with the whole model and freeze the rest (layer.freeze()), or give that part "
                            "its own learning rate with parameter groups (groups={pattern: {\"lr\": ...}})"):
        fit(model, data(), optimizer=gn.optim.SGD(model.layers[0], lr=0.1))
    assert same_weights(model, before)


def test_an_optimizer_made_with_the_model_before_it_moved_or_loaded_still_trains_it():
    model = gn.models.mlp((4, 8, 3))
    opt = gn.optim.SGD(model, lr=0.1)
    model.load_state_dict(gn.models.mlp((4, 8, 3)).state_dict())  # replaces every parameter array
    before = weights(model)
    fit(model, data(), optimizer=opt)
    assert not same_weights(model, before)  # trained: the check compares the arrays at fit time


@pytest.mark.parametrize("optimizer, name", [(None, "NoneType"), (gn.optim.Adam, "Adam"), ("adam", "str")])
def test_fit_refuses_something_that_is_not_an_optimizer(optimizer, name):
    model = gn.models.mlp((4, 8, 3))
    with raises(TypeError, "fit: optimizer must be a gpunet optimizer made with the model (gn.optim.SGD(model, lr), "
                           f"gn.optim.Adam(model), gn.optim.AdamW(model)), got {name}"):
        gn.fit(model, data(), optimizer=optimizer, steps=1, progress=False)


# ---------------------------------------------------------------- 2. History as a list of records
def test_history_gives_records_by_number_and_columns_by_name():
    model = gn.models.mlp((4, 8, 3))
    history = fit(model, data(), data(8, seed=1), steps=4, eval_every=2)
    assert len(history) == 2
    assert history[-1] == history.records[1] and history[-1]["step"] == 4 and history[0]["step"] == 2
    assert history[0:1] == [history.records[0]] and [r["step"] for r in history] == [2, 4]
    assert history["step"] == [2, 4] and history["nothing"] == [None, None]
    with raises(IndexError, "History: record 2 is out of range; it holds 2 records"):
        history[2]
    with raises(TypeError, "History: index with a record number (history[-1]), a slice or an entry's name "
                           "(history['val_loss']), got float"):
        history[1.0]


# ---------------------------------------------------------------- 3. Python lists
def test_fit_trains_on_nested_lists_as_on_float32_arrays():
    x, y = data()
    a, b = gn.models.mlp((4, 8, 3)), gn.models.mlp((4, 8, 3))
    b.load_state_dict(a.state_dict())
    fit(a, (x, y), (x[:8], y[:8]))
    history = fit(b, (x.tolist(), y.tolist()), (x[:8].tolist(), y[:8].tolist()))
    assert same_weights(b, weights(a)) and history[-1]["val_loss"] is not None
    assert gn.evaluate(b, x.tolist(), y.tolist()) == gn.evaluate(a, x, y)
    assert numpy.array_equal(b.predict(x.tolist()).probabilities, a.predict(x).probabilities)


def test_lists_of_pixel_values_stay_integers_for_an_image_model():
    x = numpy.random.default_rng(0).integers(0, 256, (12, 4, 4)).astype("uint8")
    model = gn.models.mlp((16, 8, 3))
    model.preprocess = gn.data.image_preprocess(x, (16,))
    expected = model.predict(x).probabilities
    assert numpy.array_equal(model.predict(x.tolist()).probabilities, expected)  # ints kept: no [0, 1] refusal


@pytest.mark.parametrize("call, message", [
    (lambda m: fit(m, ([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], [0, 1])),
     "training data: inputs is a ragged list: item 0 has shape (4,) but item 1 has shape (2,); every sample must "
     "have the same shape"),
    (lambda m: fit(m, ([[[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]], [0, 1])),
     "training data: inputs is a ragged list: item 0 has shape (1, 2) but item 1 has shape (2, 2); every sample "
     "must have the same shape"),
    (lambda m: fit(m, ([[1.0, 2.0, 3.0, 4.0]], [[0], 1])),
     "training data: targets is a ragged list: item 0 has shape (1,) but item 1 has shape (); every sample must "
     "have the same shape"),
    (lambda m: fit(m, ([[1.0, 2.0, "3", 4.0]], [0])),
     "training data: inputs must hold numbers, found str '3' at index (0, 2)"),
    (lambda m: fit(m, ([[1.0, 2.0, None, 4.0]], [0])),
     "training data: inputs must hold numbers, found None at index (0, 2)"),
    (lambda m: gn.evaluate(m, [[1.0, 2.0, 3.0, 4.0], [1.0]], [0, 1]),
     "evaluate: inputs is a ragged list: item 0 has shape (4,) but item 1 has shape (1,); every sample must have "
     "the same shape"),
    (lambda m: m.predict([[1.0, 2.0, 3.0, 4.0], [5.0]]),
     "predict: inputs is a ragged list: item 0 has shape (4,) but item 1 has shape (1,); every sample must have "
     "the same shape"),
    (lambda m: fit(m, (None, [0])), "training data: inputs must be an array or a list of samples, got None"),
    (lambda m: fit(m, (5.0, [0])), "training data: inputs must be an array or a list of samples, got float 5.0"),
    (lambda m: fit(m, ([numpy.zeros(4), numpy.zeros(4)], [0, 1])),
     "training data: inputs is a list of 2 arrays, for a model that takes one array (a gn.Model with several inputs or "
     "outputs takes lists); give one array (numpy.stack)"),
])
def test_ragged_or_non_numeric_lists_are_refused_in_one_line(call, message):
    model = gn.models.mlp((4, 8, 3))
    before = weights(model)
    with raises(ValueError, message):
        call(model)
    assert same_weights(model, before)


# ---------------------------------------------------------------- 4 and 5. --data folders
@pytest.mark.parametrize("x, message", [
    (numpy.full((1, 6, 6), 7, "uint8"),  # once said "--holdout must be from 0 to -1 ... got 0"
     "the data set is too small: it holds 1 image, and training needs at least 2 (one to train on, one to validate)"),
    (numpy.zeros((4, 1, 2, 6, 6), "uint8"),  # once trained, as (4, 72) images
     "images must be an array (N, H, W), (N, C, H, W) or (N, features), got shape (4, 1, 2, 6, 6) (5 dimensions)"),
], ids=["one image", "5-D images"])
def test_gpunet_train_refuses_a_data_folder_naming_the_file(x, message, tmp_path, capsys):
    folder = image_folder(tmp_path / "data", x, numpy.arange(len(x)) % 2)
    files = snapshot(folder)
    code, _, err = cli(["train", "--data", folder, "--steps", "1", "--out", tmp_path / "run", "--device", "cpu",
                        "--no-progress"], capsys)
    assert code == 1 and one_error_line(err) == f"gpunet train: {folder / 'train_images.npy'}: {message}"
    assert snapshot(folder) == files and snapshot(tmp_path / "run") == {}


def test_predict_and_eval_refuse_five_dimensional_images(tmp_path, capsys):
    model = gn.models.mlp((36, 8, 3))
    model.preprocess = gn.data.image_preprocess(numpy.arange(36, dtype="uint8").reshape(1, 6, 6), (36,))
    gn.save(model, tmp_path / "m.safetensors")
    images = tmp_path / "images.npy"
    numpy.save(images, numpy.full((2, 1, 1, 6, 6), 9, "uint8"))
    gn.data.write_idx(tmp_path / "images.idx", numpy.full((2, 1, 1, 6, 6), 9, "uint8"))
    gn.data.write_idx(tmp_path / "labels.idx", numpy.zeros(2, "uint8"))
    files = snapshot(tmp_path)
    code, out, err = cli(["predict", tmp_path / "m.safetensors", "--images", images, "--device", "cpu"], capsys)
    assert code == 1 and out == ""
    assert one_error_line(err) == (f"gpunet predict: {images}: images must be an array (N, H, W), (N, C, H, W) or "
                                   "(N, features), got shape (2, 1, 1, 6, 6) (5 dimensions)")
    code, out, err = cli(["eval", tmp_path / "m.safetensors", "--images", tmp_path / "images.idx", "--labels",
                          tmp_path / "labels.idx", "--device", "cpu"], capsys)
    assert code == 1 and out == ""
    assert one_error_line(err) == (f"gpunet eval: {tmp_path / 'images.idx'}: images must be an array (N, H, W), "
                                   "(N, C, H, W) or (N, features), got shape (2, 1, 1, 6, 6) (5 dimensions)")
    assert snapshot(tmp_path) == files


def test_a_validation_fraction_near_one_leaves_one_image_to_train():
    x, y = numpy.zeros((2, 3, 3), "uint8"), numpy.array([0, 1])
    x_train, _, x_val, _ = gn.data.split(x, y, 0.9, seed=0)
    assert (len(x_train), len(x_val)) == (1, 1)  # round(1.8) = 2 would have left none to train


# ---------------------------------------------------------------- 6. out of memory
def oom_in_linear(monkeypatch, error):
    def linear(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(NumpyOps, "linear", linear)


def test_out_of_memory_in_a_training_step_names_the_batch_and_a_smaller_one(monkeypatch, tmp_path):
    error = real_memory_error()
    assert type(error) is not MemoryError and type(error).__module__.startswith("numpy")  # its _ArrayMemoryError
    model = gn.models.mlp((4, 8, 3))
    before = weights(model)
    oom_in_linear(monkeypatch, error)
    with raises(gn.train.DeviceOutOfMemory,
                f"the CPU ran out of memory in step 1 with a batch of 16 ({error}); try a smaller batch size, "
                "e.g. 8 (--batch-size, or batch_size= of gn.fit)"):
        fit(model, data(), batch_size=64, out_dir=tmp_path / "run")
    assert same_weights(model, before) and snapshot(tmp_path / "run") == {}


def test_out_of_memory_in_evaluate_predict_and_fit_validation(monkeypatch):
    error = real_memory_error()
    model = gn.models.mlp((4, 8, 3))
    x, y = data(40)
    oom_in_linear(monkeypatch, error)
    with raises(gn.train.DeviceOutOfMemory, f"the CPU ran out of memory evaluating with a batch of 40 ({error}); "
                                            "try a smaller batch size, e.g. 20 (--batch-size, or batch_size= of "
                                            "gn.evaluate)"):
        gn.evaluate(model, x, y)
    with raises(gn.train.DeviceOutOfMemory, f"the CPU ran out of memory predicting with a batch of 25 ({error}); try "
                                            "a smaller batch size, e.g. 12 (--batch-size, or batch_size= of "
                                            "model.predict)"):
        model.predict(x, batch_size=25)
    monkeypatch.undo()
    real = NumpyOps.linear

    def linear_in_eval(self, *args, **kwargs):  # the training steps fit, the validation does not
        if not model.training:
            raise error
        return real(self, *args, **kwargs)
    monkeypatch.setattr(NumpyOps, "linear", linear_in_eval)
    with raises(gn.train.DeviceOutOfMemory,
                f"the CPU ran out of memory validating after step 2 with a batch of 8 ({error}); try a smaller batch "
                "size, e.g. 4 (fit validates in batches of its batch_size; pass val as an object whose "
                "evaluate(model, loss) returns gn.evaluate(model, x, y, loss, batch_size=...))"):
        fit(model, (x, y), (x, y), batch_size=8)
    assert model.training  # evaluation's eval mode was undone


def test_gpunet_train_reports_out_of_memory_in_one_line_and_keeps_the_data(monkeypatch, tmp_path, capsys):
    error = real_memory_error()
    x = numpy.random.default_rng(0).integers(0, 256, (50, 6, 6)).astype("uint8")
    folder = image_folder(tmp_path / "data", x, numpy.arange(50) % 2)
    files = snapshot(folder)
    real = NumpyOps.linear

    def linear(self, x, *args, **kwargs):  # the model summary's forward of one sample fits; a batch does not
        if len(x) > 1:
            raise error
        return real(self, x, *args, **kwargs)
    monkeypatch.setattr(NumpyOps, "linear", linear)
    code, _, err = cli(["train", "--data", folder, "--model", "mlp", "--steps", "1", "--batch-size", "100000",
                        "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys)
    assert code == 1
    assert one_error_line(err) == (f"gpunet train: the CPU ran out of memory in step 1 with a batch of 45 ({error}); "
                                   "try a smaller batch size, e.g. 22 (--batch-size, or batch_size= of gn.fit)")
    assert snapshot(folder) == files
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "last.safetensors").exists()


def test_a_real_out_of_memory_from_a_huge_batch_is_one_line():
    """No monkeypatch: a 2**24-sample batch through Dense(1, 2**22) asks NumPy for 2**48 bytes (256 TiB)."""
    model = gn.models.mlp((1, 2**22))
    x = numpy.broadcast_to(numpy.ones((1, 1), "float32"), (2**24, 1))  # 4 bytes held, 2**24 samples
    y = numpy.broadcast_to(numpy.zeros(1, "int64"), (2**24,))
    with pytest.raises(gn.train.DeviceOutOfMemory, match=r"^the CPU ran out of memory evaluating with a batch of "
                       r"16777216 \(Unable to allocate 256\. TiB for an array with shape \(16777216, 4194304\) and "
                       r"data type float32\); try a smaller batch size, e\.g\. 8388608 \(--batch-size, or batch_size= "
                       r"of gn\.evaluate\)$"):
        gn.evaluate(model, x, y, batch_size=2**24)


@pytest.mark.gpu
def test_cupy_out_of_memory_is_recognised_by_its_type(monkeypatch):
    import cupy
    from gpunet.backend.cupy_ops import CupyOps

    error = cupy.cuda.memory.OutOfMemoryError(1 << 30, 1 << 30)
    assert isinstance(error, MemoryError)

    def linear(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(CupyOps, "linear", linear)
    model = gn.models.mlp((4, 8, 3)).to("gpu")
    with raises(gn.train.DeviceOutOfMemory, f"the GPU ran out of memory in step 1 with a batch of 16 ({error}); try a "
                                            "smaller batch size, e.g. 8 (--batch-size, or batch_size= of gn.fit)"):
        fit(model, data())


def test_out_of_memory_outside_a_batch_is_one_line_too(monkeypatch, tmp_path, capsys):
    error = real_memory_error()
    x = numpy.random.default_rng(0).integers(0, 256, (50, 6, 6)).astype("uint8")
    folder = image_folder(tmp_path / "data", x, numpy.arange(50) % 2)
    oom_in_linear(monkeypatch, error)  # the model summary's forward, before training
    code, _, err = cli(["train", "--data", folder, "--model", "mlp", "--steps", "1", "--out", tmp_path / "run",
                        "--device", "cpu", "--no-progress"], capsys)
    assert code == 1 and one_error_line(err) == f"gpunet train: out of memory ({error})"


def test_out_of_memory_with_a_batch_of_one_says_no_batch_is_small_enough(monkeypatch):
    error = real_memory_error()
    oom_in_linear(monkeypatch, error)
    with raises(gn.train.DeviceOutOfMemory, f"the CPU ran out of memory predicting with a batch of 1 ({error}); one "
                                            "sample does not fit: free memory, or use a smaller model"):
        gn.models.mlp((4, 8, 3)).predict(data(1)[0])


# ---------------------------------------------------------------- 7. more inputs that reached NumPy unchecked
@pytest.mark.parametrize("call, exc_type, message", [
    (lambda m: fit(m, [*data()]), TypeError,
     "fit: train must be a tuple (x, y) of arrays or lists, or an object with __len__ and get(indices, rng), got list"),
    (lambda m: fit(m, data(), (data()[0],)), ValueError, "fit: val must be (x_val, y_val), got a tuple of 1 item"),
    (lambda m: fit(m, data(), [*data()]), TypeError,
     "fit: val must be a tuple (x_val, y_val) of arrays or lists, or an object with evaluate(model, loss), got list"),
    (lambda m: fit("model", data(), optimizer=gn.optim.SGD(m, 0.1)), TypeError,
     "fit: model must be a gpunet layer or model (gn.Sequential(...), gn.models.mlp(...)), got str"),
    (lambda m: fit(m, (data()[0], data()[1] + 0.5)), ValueError,
     "training data: softmax_cross_entropy takes integer class ids, got float64 labels with fractions (0.5 at index 0)"),
    (lambda m: fit(m, data(), (data()[0], data()[1].astype("float32"))), ValueError,
     "validation data: softmax_cross_entropy takes integer class ids, got float32 labels; convert them with "
     "y.astype('int64')"),
    (lambda m: gn.evaluate(m, numpy.full((2, 4), numpy.nan, "float32"), [0, 1]), ValueError,
     "evaluate: input contains NaN or Inf (first at index (0, 0))"),
    (lambda m: gn.evaluate(m, *data(), loss="hinge"), ValueError,
     "evaluate: unknown loss 'hinge'; choose one of softmax_cross_entropy, mse, binary_cross_entropy_with_logits"),
    (lambda m: gn.optim.Adam(0.001), TypeError,
     "Adam: the first argument must be the model it updates (a gpunet layer or model), got float"),
    (lambda m: gn.evaluate(m, None, [0]), ValueError, "evaluate: inputs must be an array or a list of samples, got None"),
    (lambda m: m.predict(numpy.array([[0.0, 1.0, numpy.inf, 0.0]], "float32")), ValueError,
     "predict: input contains NaN or Inf (first at index (0, 2))"),
    (lambda m: m.predict([[1.0, 2.0, 3.0, "x"]]), ValueError,
     "predict: inputs must hold numbers, found str 'x' at index (0, 3)"),
])
def test_more_inputs_are_refused_in_one_line_before_any_step(call, exc_type, message):
    model = gn.models.mlp((4, 8, 3))
    before = weights(model)
    with raises(exc_type, message):
        call(model)
    assert same_weights(model, before)
