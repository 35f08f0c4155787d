"""Same seed, two devices: the training trajectories of every model agree, dropout included,
layer by layer and step by step. Without a GPU the harness is checked against itself and against
an independent recomputation; on the CuPy stand-in the GPU side runs the real kernels emulated."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import parity
from gpunet.backend import devices, ops_for_device
from gpunet.cli import main
from tests.support.arrays import ON_STANDIN

MODELS = ["mlp", "cnn", "rnn", "transformer"]
# Small for the stand-in, whose kernels run in the CPU emulator; the same sizes on a real GPU.
STEPS, BATCH = 3, 4
# The rate parity.compare gets per model: None keeps the recipe's (mlp and cnn have dropout 0.1);
# rnn gets a Dropout on its output, the transformer's blocks their dropout. All four drop out.
DROPOUT = {"mlp": None, "cnn": None, "rnn": 0.2, "transformer": 0.1}


@pytest.fixture
def our_gemm_on_the_standin(monkeypatch):
    """On the stand-in "cuBLAS" is NumPy's matmul, the CPU's own arithmetic, and the dispatch
    picks it: force the fused GEMM kernel there, so that parity covers our kernel too."""
    if ON_STANDIN:
        monkeypatch.setattr(ops_for_device("gpu"), "gemm_mode", "fused")


def assert_within_bound(report):
    """Every step's loss, activation and gradient differences within the float32 bound of one step
    (gpunet.parity_bound: derived from the sums the step runs, the same on any CPU or GPU)."""
    bound = report["bound"]
    for step, row in enumerate(zip(*parity.rows_of(report)), 1):
        for what, diff in zip(("loss", "activations", "gradients"), row):
            assert diff <= bound, f"{report['model']} step {step}: {what} differ by {diff:.2e} > bound {bound:.2e}"


def lockstep(model, steps=STEPS, batch_size=BATCH):
    return parity.compare(model, steps=steps, devices=("cpu", "gpu"), batch_size=batch_size,
                          dropout=DROPOUT[model], lockstep=True)


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
@pytest.mark.parametrize("model", MODELS)
def test_every_step_agrees_between_cpu_and_gpu(model):
    """In lockstep (the GPU starts each step from the CPU's parameters and Adam state) a step's
    differences are one step's rounding: no CPU's BLAS kernels can move them past the bound. Free
    running, Adam amplifies rounding-level gradient differences into learning-rate-sized updates
    (its step divides by the root of tiny second moments), so step 3 of the transformer differed
    by 1e-4 on one CPU and 1.09e-4 on another."""
    report = lockstep(model)
    assert report["lockstep"] and len(report["loss_diff"]) == len(report["step_activation_diff"]) == STEPS
    assert 1e-4 < report["bound"] < 0.05  # the recipes' sums: from 2.4e-3 (mlp) to 4.2e-2 (rnn's 64 steps)
    assert_within_bound(report)


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
def test_lockstep_starts_each_step_from_the_first_devices_state(monkeypatch):
    """Lockstep must copy the state before the first side's step, not after: a copy taken after it
    puts the second side one Adam step ahead, which reads as differences of order 1."""
    report = lockstep("mlp", steps=2)
    free = parity.compare("mlp", steps=2, devices=("cpu", "gpu"), batch_size=BATCH, lockstep=False)
    assert report["loss_diff"][0] == free["loss_diff"][0]  # step 1 starts identical either way
    assert report["losses"][1][0] == free["losses"][1][0]  # the CPU side runs as it would alone
    assert_within_bound(report)


def _planted(monkeypatch, layer_type, method, corrupt):
    """Make `method` of every `layer_type` on the GPU return what `corrupt` makes of it (on the CPU
    it runs as it is), as a bug in one backend would."""
    original = getattr(layer_type, method)

    def planted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.device == "gpu":
            return corrupt(self, out)
        return out
    monkeypatch.setattr(layer_type, method, planted)


def _swap_first_rows(layer, out):
    """A swapped index: the first two rows of the output exchanged."""
    out[[0, 1]] = out[[1, 0]].copy()
    return out


def _wrong_weight_gradient(layer, dx):
    """A wrong gradient: the weight gradient's largest element 10% off (a term dropped from its sum;
    a normwise difference measures an error in a small element against the largest)."""
    grad = layer.grads["weight"]
    flat = grad.reshape(-1)
    flat[int(abs(flat).argmax())] *= 1.1
    return dx


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
@pytest.mark.parametrize("model", ["mlp", "rnn", "transformer"])
@pytest.mark.parametrize("bug", [("forward", _swap_first_rows), ("backward", _wrong_weight_gradient)],
                         ids=["swapped-rows", "wrong-gradient"])
def test_a_planted_bug_leaves_the_bound(monkeypatch, model, bug):
    """The bound is loose enough for any machine's rounding and still far below a real bug's
    differences: each planted bug in the last Dense layer's GPU side fails the comparison."""
    _planted(monkeypatch, gn.layers.Dense, bug[0], bug[1])
    report = lockstep(model, steps=1)
    with pytest.raises(AssertionError, match="> bound"):
        assert_within_bound(report)


@pytest.mark.gpu
@pytest.mark.real_gpu(reason="compares cuBLAS's products with the CPU's over 50 steps; on the stand-in cuBLAS is "
                             "NumPy's matmul (and the run takes 10 min); test_every_step_agrees_between_cpu_and_gpu "
                             "runs the comparison through gpunet's own kernels")
@pytest.mark.parametrize("model", MODELS)
def test_cpu_and_gpu_trajectories_agree(model):
    """50 steps in lockstep, each within one step's bound (free running, differences grow with the
    steps as Adam amplifies them; their size then depends on the machines, not on gpunet)."""
    report = parity.compare(model, steps=50, devices=("cpu", "gpu"), batch_size=16, lockstep=True)
    assert_within_bound(report)


@pytest.mark.parametrize("model", MODELS)
def test_the_same_device_gives_identical_trajectories(model):
    report = parity.compare(model, steps=3, devices=("cpu", "cpu"), batch_size=4)
    assert all(a == b for a, b in report["losses"])
    assert max(report["activation_diff"]) == 0.0 and max(report["grad_diff"].values()) == 0.0
    assert report["loss_diff"] == report["step_activation_diff"] == report["step_grad_diff"] == [0.0] * 3
    assert len(report["layers"]) == len(report["activation_diff"]) and report["grad_diff"]
    text = parity.format_report(report)
    assert "layer activations:" in text and "loss on cpu" in text and "gradients" in text


def test_recorded_steps_are_each_steps_own():
    """The recording must copy: layers and the optimizer reuse their buffers, so a record that
    keeps the live arrays shows the last step's values for every step (and CPU-vs-CPU cannot see
    that, both sides being wrong alike). Checked against a recomputation that reads each step's
    values while they are current."""
    seed = 5
    model, data, r = parity.model_and_batches("mlp", 3, 4, seed)
    record = parity.run(model, data, "cpu", r.lr, seed)
    twin = parity._copy(model)
    optimizer = gn.optim.Adam(twin, lr=r.lr)
    gn.manual_seed(seed)  # the same dropout masks: the same key, and each step's own counter
    for step, (x, y) in enumerate(data):
        gn.random.set_step(step)
        out = gn.data.pipeline.apply_preprocess(twin.preprocess, x, numpy)
        for i, layer in enumerate(twin.layers):
            out = layer.forward(out)
            numpy.testing.assert_array_equal(record[step][1][i], out, err_msg=f"step {step + 1}, layer {i}")
        loss, grad = gn.losses.softmax_cross_entropy(out, y)
        twin.backward(grad, input_grad=False)
        assert record[step][0] == float(loss)
        for name, value in twin.grads.items():
            numpy.testing.assert_array_equal(record[step][2][name], value, err_msg=f"step {step + 1}, {name}")
        optimizer.step()
    assert any(not numpy.array_equal(record[0][2][k], record[2][2][k]) for k in record[0][2])


@pytest.mark.parametrize("model", MODELS)
def test_dropout_option_keeps_weights_and_parameter_names(model):
    plain = parity.model_and_batches(model, 1, 2, seed=0)[0]
    dropped = parity.model_and_batches(model, 1, 2, seed=0, dropout=0.3)[0]
    assert list(dropped.params) == list(plain.params)
    for name, value in plain.params.items():
        numpy.testing.assert_array_equal(dropped.params[name], value)
    rates = [c["args"]["p"] for c in _configs(dropped.to_config()) if c.get("type") == "Dropout"]
    rates += [c["args"]["dropout"] for c in _configs(dropped.to_config()) if "dropout" in c.get("args", {})]
    assert rates and set(rates) == {0.3}


def test_dropout_changes_the_run_and_stays_identical_across_runs():
    kwargs = dict(steps=2, devices=("cpu", "cpu"), batch_size=4)
    without = parity.compare("cnn", **kwargs)
    with_dropout = parity.compare("cnn", dropout=0.5, **kwargs)
    assert with_dropout["losses"][0][0] != without["losses"][0][0]  # masks were drawn and applied
    assert with_dropout["loss_diff"] == [0.0, 0.0] and max(with_dropout["step_grad_diff"]) == 0.0
    assert "dropout 0.5" in parity.format_report(with_dropout)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        parity.compare("cnn", dropout=1.5, **kwargs)


def test_relative_difference():
    assert parity.relative_difference(numpy.array([1.0, 2.0]), numpy.array([1.0, 4.0])) == pytest.approx(0.5)


def test_parity_without_a_gpu_says_why(monkeypatch):
    # the stand-in (or a real GPU) may be usable here: make the GPU unusable for this test
    monkeypatch.setattr(devices, "gpu_status", lambda: (False, "no CUDA device in this test"))
    with pytest.raises(SystemExit, match="no GPU is usable: no CUDA device in this test"):
        main(["parity", "--model", "mlp", "--steps", "2"])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan"])
def test_parity_dropout_flag_is_checked(capsys, value):
    with pytest.raises(SystemExit):
        main(["parity", "--dropout", value])
    assert f"argument --dropout: must be a dropout rate in [0, 1), got '{value}'" in capsys.readouterr().err


@pytest.mark.gpu
def test_parity_command_with_dropout(capsys):
    assert main(["parity", "--model", "mlp", "--steps", "1", "--batch-size", "2", "--dropout", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "parity of mlp: cpu vs gpu, 1 steps, dropout 0.3" in out and "Dropout(p=0.3)" in out


def _configs(config):
    """Every layer description inside a to_config() tree."""
    if isinstance(config, dict):
        if "type" in config:
            yield config
        for value in config.values():
            yield from _configs(value)
    elif isinstance(config, list):
        for value in config:
            yield from _configs(value)



@pytest.mark.gpu
def test_parity_command_in_lockstep_states_the_bound(capsys):
    assert main(["parity", "--model", "mlp", "--steps", "2", "--batch-size", "2", "--lockstep"]) == 0
    out = capsys.readouterr().out
    assert "parity of mlp: cpu vs gpu, 2 steps, in lockstep" in out
    assert "bound on one float32 step's differences: " in out and "every step within it" in out
