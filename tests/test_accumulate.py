"""Gradient accumulation (issue 29, item 4): fit(accumulate=N) takes one optimizer step per N batches,
equal to one step of batch_size=N*B on the same samples when dropout and batch norm are off; with them,
the step is the one the documented rule gives (masks drawn per batch from random step step*N + i,
batch-norm statistics per batch), checked against a hand-written loop. An interrupted step is dropped
and redone on resume; the data-parallel test runs this file as its ranks' worker (mpiexec -n 2).

The comparisons with one large batch are float64 and bounded by STEPS * GROUP * 2**-53 relative to the
largest entry of each parameter: every gradient entry is a sum over the GROUP samples of a step, taken in
another order (and with the loss gradient scaled by n_i / n first), so the two gradients differ by at
most about GROUP * u of the sum of their terms' magnitudes (Higham's gamma_n), and the steps add such
differences at most STEPS times. (Adam divides by the gradient's own root-mean-square, which could
magnify the difference of an entry that nearly cancels; the runs here stay thousands of times below.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.parity import relative_difference

STEPS, MICRO, N = 20, 32, 4
GROUP = MICRO * N
BOUND = STEPS * GROUP * 2.0**-53  # 2.8e-13: see the module docstring


def data(n, features=20, seed=0, dtype="float64"):
    r = numpy.random.default_rng(seed)
    return r.normal(size=(n, features)).astype(dtype), r.integers(0, 10, n)


def fit(n, accumulate, batch_size, *, optimizer="adam", clip_norm=None, schedule=False, dtype="float64",
        device="cpu", model=None, setup=None, steps=STEPS, **kwargs):
    """Train a seeded model (dtype) on n seeded samples; returns (params, buffers, history)."""
    gn.manual_seed(0)
    model = (model() if model else gn.models.mlp((20, 32, 16, 10))).to(device, dtype=dtype)
    if setup:
        setup(model)
    if optimizer == "sgd":
        opt = gn.optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3)
    elif optimizer == "groups":
        opt = gn.optim.Adam(model, lr=1e-2, groups={"2.*": {"lr": 3e-3, "weight_decay": 1e-2}})
    else:
        opt = gn.optim.Adam(model, lr=1e-2)
    sched = gn.optim.CosineLR(opt, t_max=steps, warmup=4) if schedule else None
    history = gn.fit(model, data(n, dtype=dtype), optimizer=opt, steps=steps, batch_size=batch_size,
                     accumulate=accumulate, clip_norm=clip_norm, schedule=sched, progress=False, **kwargs)
    host = {k: gn.to_numpy(v).copy() for k, v in model.state_dict().items()}
    return {k: host[k] for k in model.params}, {k: host[k] for k in model.buffers}, history


def differences(got: dict, expected: dict) -> dict:
    return {name: relative_difference(got[name], expected[name]) for name in expected}


def report(title: str, table: dict) -> None:
    print(f"\n{title}: largest relative difference per parameter (float64, bound {BOUND:.1e})")
    for name, value in table.items():
        print(f"  {name:10s} {value:.2e}  ({value / 2.0**-53:.1f} u)")


CASES = {  # 1280 samples: ten whole steps an epoch; 300: two steps of 128 and a short one of 44 (32 + 12)
    "sgd-momentum": dict(n=1280, optimizer="sgd"),
    "adam": dict(n=1280, optimizer="adam"),
    "adam-clip-cosine": dict(n=1280, optimizer="adam", clip_norm=0.5, schedule=True),
    "sgd-short-last-step": dict(n=300, optimizer="sgd"),
    "adam-short-last-step-clip-cosine": dict(n=300, optimizer="adam", clip_norm=0.5, schedule=True),
}


@pytest.mark.parametrize("case", CASES)
def test_four_batches_of_32_step_as_one_batch_of_128(case):
    """The issue's figure: accumulate=4, batch_size=32 against batch_size=128 after 20 optimizer steps."""
    got, _, history = fit(accumulate=N, batch_size=MICRO, **CASES[case])
    expected, _, reference = fit(accumulate=1, batch_size=GROUP, **CASES[case])
    table = differences(got, expected)
    report(f"{case}: accumulate={N}, batch_size={MICRO} vs batch_size={GROUP}, {STEPS} steps", table)
    assert max(table.values()) <= BOUND, table
    assert [r["step"] for r in history] == [r["step"] for r in reference]  # evaluations count optimizer steps
    assert history["train_loss"] == pytest.approx(reference["train_loss"], rel=BOUND)


def test_parameter_groups_and_a_frozen_layer_accumulate_as_one_batch():
    def freeze_first(model):
        model.layers[0].freeze()

    got, _, _ = fit(300, N, MICRO, optimizer="groups", setup=freeze_first, clip_norm=0.5)
    expected, _, _ = fit(300, 1, GROUP, optimizer="groups", setup=freeze_first, clip_norm=0.5)
    table = differences(got, expected)
    assert max(table.values()) <= BOUND, table
    start = {k: gn.to_numpy(v) for k, v in gn.models.mlp((20, 32, 16, 10)).params.items()}
    assert numpy.array_equal(got["0.weight"], expected["0.weight"])  # frozen: never updated, either way
    assert not numpy.array_equal(got["2.weight"], start["2.weight"])


def test_accumulate_one_is_the_step_as_before():
    plain, _, history = fit(300, 1, 64, steps=6)
    gn.manual_seed(0)
    model = gn.models.mlp((20, 32, 16, 10)).to(dtype="float64")
    before = gn.fit(model, data(300), optimizer=gn.optim.Adam(model, lr=1e-2), steps=6, batch_size=64, progress=False)
    assert all(numpy.array_equal(plain[k], gn.to_numpy(model.params[k])) for k in plain)
    assert history.records[-1]["train_loss"] == before.records[-1]["train_loss"]


def dropout_norm_model():
    return gn.Sequential(gn.layers.Dense(20, 32), gn.layers.BatchNorm1d(32), gn.layers.ReLU(), gn.layers.Dropout(0.3),
                         gn.layers.Dense(32, 10))


def hand_written(n, steps, accumulate, batch_size):
    """The documented rule, step by step without fit: the step's order is fit's (seed 0), each batch
    draws its masks at random step step * N + i and normalises with its own statistics, its loss
    gradient is scaled by its share of the step's samples and the gradients are summed."""
    gn.manual_seed(0)
    model = dropout_norm_model().to(dtype="float64").train()
    opt = gn.optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3)  # fit's "sgd"
    x, y = data(n)
    size, step, epoch = accumulate * batch_size, 0, 0
    while step < steps:
        order = numpy.random.default_rng([0, epoch]).permutation(n)
        for start in range(0, n, size):
            group = order[start : start + size]
            sums = {k: numpy.zeros_like(v) for k, v in model.params.items()}
            for i, first in enumerate(range(0, len(group), batch_size)):
                idx = group[first : first + batch_size]
                gn.random.set_step(step * accumulate + i)
                _, dy = gn.losses.softmax_cross_entropy(model.forward(x[idx]), y[idx])
                model.backward_params(dy * (len(idx) / len(group)))
                for k in sums:
                    sums[k] += model.grads[k]
            for k in sums:
                model.grads[k][...] = sums[k]
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    return {k: gn.to_numpy(v).copy() for k, v in model.state_dict().items()}


def test_with_dropout_and_batch_norm_each_batch_has_its_own_masks_and_statistics():
    """What differs from one large batch, exactly: the hand-written rule above, which fit follows; and
    the large batch is another step (one set of statistics, masks drawn for 128 rows at once)."""
    def sgd_fit(accumulate, batch_size):
        params, buffers, _ = fit(300, accumulate, batch_size, optimizer="sgd", model=dropout_norm_model, steps=8)
        return {**params, **buffers}

    got, expected = sgd_fit(N, MICRO), hand_written(300, 8, N, MICRO)
    table = differences(got, expected)
    assert max(table.values()) <= BOUND, table
    assert got["1.num_batches_tracked"] == 8 * N - 2 * 2  # a batch-norm update per batch: 2 short steps of 2 batches
    one_batch = sgd_fit(1, GROUP)
    assert relative_difference(one_batch["1.running_mean"], got["1.running_mean"]) > 1e-3


def test_on_batch_end_fires_after_each_batch_and_on_step_after_the_step():
    class Log(gn.callbacks.Callback):
        def __init__(self):
            self.calls = []

        def on_step(self, step, loss):
            self.calls.append(("step", step, float(loss)))

        def on_batch_end(self, step, loss):
            self.calls.append(("batch", step, float(loss)))

    log = Log()
    fit(100, 3, 16, steps=3, callbacks=[log])  # steps of 48, 48 and a short one of 4: batches 16+16+16, 16+16+16, 4
    assert [c[:2] for c in log.calls] == [("batch", 1)] * 3 + [("step", 1)] + [("batch", 2)] * 3 + [("step", 2)] + \
        [("batch", 3), ("step", 3)]
    batches, step = [c[2] for c in log.calls[:3]], log.calls[3][2]
    assert step == pytest.approx(sum(batches) / 3, rel=1e-12)  # three batches of 16: the step's mean loss
    assert log.calls[-2][2] == pytest.approx(log.calls[-1][2], rel=1e-12)  # one batch of 4: its own loss


class StopInStep(gn.callbacks.Callback):
    """Sends SIGINT (Ctrl-C) after batch `batch` of step `step`, once."""

    def __init__(self, step, batch):
        self.step, self.batch, self.seen = step, batch, 0

    def on_batch_end(self, step, loss):
        if step == self.step:
            self.seen += 1
            if self.seen == self.batch:
                os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_step_is_dropped_and_redone_on_resume(tmp_path):
    """Ctrl-C after batch 2 of the 3 of step 5: the step is dropped (the batch-norm statistics it moved
    put back), last.safetensors holds step 4, and the resumed run ends as the uninterrupted one, bit for bit.
    (100 samples in steps of 3 batches of 16: steps of 48, 48 and 4 an epoch.)"""
    def run(out, callbacks=(), resume=False):
        return fit(100, 3, 16, steps=9, optimizer="sgd", model=dropout_norm_model, dtype="float32", eval_every=3,
                   out_dir=out, callbacks=list(callbacks), resume=resume)

    whole, whole_buffers, whole_history = run(tmp_path / "whole")
    with pytest.raises(gn.train.TrainingInterrupted) as stopped:
        run(tmp_path / "parts", [StopInStep(5, 2)])
    assert "interrupted at step 4 (batches 1 to 2 of the 3 of step 5 dropped: a resume takes that step from its " \
           "first batch); saved" in str(stopped.value)
    saved = gn.training.checkpoint.read_checkpoint(tmp_path / "parts" / "last.safetensors")
    state = saved[2]["training"]["state"]
    assert (state["step"], state["epoch"], state["sample"]) == (4, 1, 48)  # 48 + 48 + 4, then 48
    params, buffers, history = run(tmp_path / "parts", resume=True)
    for name in whole:
        assert numpy.array_equal(params[name], whole[name]), name
    for name in whole_buffers:
        assert numpy.array_equal(buffers[name], whole_buffers[name]), name
    assert [(r["step"], r["train_loss"]) for r in history] == [(r["step"], r["train_loss"]) for r in whole_history]


def test_a_resume_with_another_accumulate_goes_on_from_the_same_sample(tmp_path):
    said = []
    fit(300, 4, 32, steps=2, out_dir=tmp_path / "run")
    saved = gn.training.checkpoint.read_checkpoint(tmp_path / "run" / "last.safetensors")[2]["training"]
    assert saved["config"]["accumulate"] == 4 and saved["config"]["batch_size"] == 32
    _, _, history = fit(300, 2, 32, steps=4, out_dir=tmp_path / "run", resume=True, log=said.append)
    assert said == ["resume: applying changed settings from step 2: accumulate: 4 -> 2"]
    # from sample 256: a step of the last 44 samples (an epoch end), then one of 64 of the second epoch
    assert [(r["step"], r["epoch"]) for r in history] == [(2, 1), (3, 1), (4, 2)]


def test_a_run_saved_before_accumulation_resumes_as_one_batch_a_step():
    from gpunet.training import resume

    older = {"batch_size": 32, "eval_every": None, "lr": 0.1}
    assert resume.differences(resume._saved_as_now(older, {}, None), {**older, "accumulate": 1, "precision": "fp32"}) \
        == ([], [])


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4", None])
def test_fit_refuses_a_bad_accumulate_in_one_line(value):
    model = gn.models.mlp((20, 10))
    with pytest.raises(ValueError) as refused:
        gn.fit(model, data(10, dtype="float32"), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, accumulate=value)
    assert str(refused.value) == f"fit: accumulate must be a positive integer, got {value!r}"


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_the_train_command_refuses_a_bad_accumulate(value, capsys):
    from gpunet.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--accumulate", value])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"gpunet train: argument --accumulate: must be a positive integer, got {value!r} "
                                       "(usage: gpunet train --help)\n")  # one line


def test_the_train_command_accumulates(tmp_path, capsys):
    from gpunet.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "16", "--accumulate", "3", "--device", "cpu", "--out",
                 str(out), "--no-progress"]) == 0
    assert "batch 16 x 3 accumulated" in capsys.readouterr().out
    saved = gn.training.checkpoint.read_checkpoint(out / "last.safetensors")[2]["training"]
    assert saved["config"]["accumulate"] == 3 and saved["state"]["step"] == 4 and saved["state"]["sample"] == 4 * 48


# ---------------------------------------------------------------- the GPU (the stand-in where none is usable)
@pytest.mark.gpu
def test_on_the_gpu_four_batches_step_as_one_batch():
    got, _, _ = fit(300, N, MICRO, optimizer="adam", clip_norm=0.5, schedule=True, device="gpu", cuda_graph=False)
    expected, _, _ = fit(300, 1, GROUP, optimizer="adam", clip_norm=0.5, schedule=True, device="gpu", cuda_graph=False)
    table = differences(got, expected)
    report("gpu: accumulate=4, batch_size=32 vs batch_size=128", table)
    assert max(table.values()) <= BOUND, table


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer, clip_norm, schedule", [("adam", 0.5, True), ("sgd", None, False)])
def test_replayed_accumulation_equals_eager_accumulation(optimizer, clip_norm, schedule):
    """float32 (graphs need it), dropout on, 200 samples in steps of 3 batches of 24: steps of 72, 72
    and a short one of 56 (24 + 24 + 8), so two batch shapes replay, each with its weights."""
    from tests.support.arrays import ON_STANDIN

    def model():
        return gn.Sequential(gn.layers.Dense(20, 16), gn.layers.ReLU(), gn.layers.Dropout(0.2), gn.layers.Dense(16, 10))

    said = []
    kw = dict(optimizer=optimizer, clip_norm=clip_norm, schedule=schedule, dtype="float32", device="gpu", model=model,
              steps=9)
    eager, _, eager_history = fit(200, 3, 24, cuda_graph=False, **kw)
    replayed, _, history = fit(200, 3, 24, cuda_graph=True, log=said.append, **kw)
    assert said == []
    tolerance = 0 if ON_STANDIN else 1e-5
    for name in eager:
        numpy.testing.assert_allclose(replayed[name], eager[name], rtol=tolerance, atol=tolerance, err_msg=name)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=tolerance, abs=tolerance)


@pytest.mark.gpu
def test_a_replayed_accumulated_step_is_a_graph_per_batch_and_one_for_the_update(monkeypatch):
    from tests import gpu_standin
    from tests.support.arrays import ON_STANDIN
    from gpunet.training import accumulate, cuda_graph

    if not ON_STANDIN:
        pytest.skip("counts launches on the CuPy stand-in")
    counts, original = [], accumulate.step

    def counted(run, idx):
        with gpu_standin.counting() as c:
            value = original(run, idx)
        counts.append(c)
        return value

    monkeypatch.setattr(accumulate, "step", counted)
    made = []
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", lambda self, x, y, o=cuda_graph.GraphedStep._capture:
                        made.append(None if x is None else x.shape) or o(self, x, y))
    fit(256, N, MICRO, dtype="float32", device="gpu", steps=6, cuda_graph=True)
    assert made == [(MICRO, 20), None]  # the batch's graph (captured after its first eager run), the update's
    for c in counts[1:]:  # every step after the first: N batch replays and one update replay, no host read
        assert c["graph_launches"] == N + 1 and c["raw_launches"] == 0 and c["d2h"] == 0, c
        # each batch: its images, labels and record in, its loss out (a copy) and its share of the step's loss
        # (2, 1 for the first); the step: its record in, the sums zeroed (1), the running loss (1)
        assert c["h2d"] == 3 * N + 1 and c["launches"] == N + (2 * N - 1) + 2, c


# ---------------------------------------------------------------- data-parallel (two ranks, mpiexec)
def _launch_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def _rank_job(job: dict) -> dict:
    """What a rank (or the one-process reference) trains: 97 samples in steps of 48 (3 batches of 16, each
    rank 8 of each) and a last step of 1 sample, which leaves a rank no sample in the whole step."""
    params, _, history = fit(97, job["accumulate"], job["batch"], optimizer="adam", clip_norm=0.5, steps=6)
    return {**params, "train_loss": numpy.array(history.records[-1]["train_loss"]),
            "world_size": numpy.array(history.records[-1]["world_size"])}


def test_two_ranks_accumulate_as_one_process_takes_one_batch(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra (pip install -e '.[mpi]') is not installed")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (the mpich wheel of the mpi extra)")
    job = {"accumulate": 3, "batch": 16, "result": str(tmp_path / "ranks")}
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, __file__, json.dumps(job)], capture_output=True,
                          text=True, timeout=120, env=_launch_environment())
    assert done.returncode == 0, done.stderr
    expected = _rank_job({"accumulate": 1, "batch": 48})
    for rank in (0, 1):
        got = dict(numpy.load(f"{job['result']}.rank{rank}.npz"))
        assert int(got["world_size"]) == 2 and int(expected["world_size"]) == 1
        table = {k: relative_difference(got[k], expected[k]) for k in expected if k not in ("train_loss", "world_size")}
        assert max(table.values()) <= BOUND, (rank, table)
        assert float(got["train_loss"]) == pytest.approx(float(expected["train_loss"]), rel=BOUND)


if __name__ == "__main__":  # a rank of test_two_ranks_accumulate_as_one_process_takes_one_batch
    from gpunet import distributed

    job = json.loads(sys.argv[1])
    numpy.savez(f"{job['result']}.rank{distributed.rank()}.npz", **_rank_job(job))
