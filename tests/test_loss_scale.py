"""fp16 dynamic loss scaling (issue 30, item 2; gpunet.training.loss_scale): torch.amp.GradScaler's rule,
the check and the skip on the device (CUDA graphs replay them), a skipped step leaving the parameters, the
optimizer's state and its step count as they were, the scale fixed within an accumulated step, saved and
exact on resume, the divergence watch telling a skipped overflow from divergence, and the same scales and
skipped steps on the CPU (the reference) as on the GPU (the stand-in).

The overflow is forced with a poisoned sample: every batch holding sample 0 has its inputs multiplied by
1e34, so its loss or its scaled gradient is not finite (in float32 already, whatever fp16 rounds).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.backend import precision
from gpunet.training import loss_scale
from gpunet.training.checkpoint import read_checkpoint
from tests.support.arrays import ON_STANDIN

ROOT = Path(__file__).resolve().parents[1]
POISON = 1e34


class Poisoned:
    """Training data whose batches holding sample 0 (or the batch of call `at_call` alone) are multiplied by
    POISON (an overflow); notes the loop step of each such batch (the calls to get, one per step without
    accumulation)."""

    def __init__(self, n=512, features=6, seed=0, poisoned=True, factor=POISON, at_call=None):
        r = numpy.random.default_rng(seed)
        self.x = r.standard_normal((n, features)).astype("float32")
        self.y = self.x[:, :3].argmax(axis=1)
        self.poisoned, self.factor, self.at_call, self.calls, self.hits = (poisoned, numpy.float32(factor), at_call,
                                                                           0, [])

    def __len__(self):
        return len(self.x)

    def get(self, indices, rng):
        self.calls += 1
        x = self.x[indices].copy()
        if self.poisoned and (0 in indices if self.at_call is None else self.calls == self.at_call):
            x *= self.factor
            self.hits.append(self.calls)
        return x, self.y[indices]


def run(device="cpu", *, steps=12, batch_size=32, optimizer="adam", data=None, precision="fp16", seed=0, **kwargs):
    """A seeded fit of a small MLP; returns (model, optimizer, history, data)."""
    gn.manual_seed(seed)
    model = gn.models.mlp((6, 16, 3)).to(device, dtype=kwargs.pop("dtype", "float32"))
    opt = (gn.optim.Adam(model, lr=1e-2) if optimizer == "adam" else
           gn.optim.SGD(model, lr=0.1, momentum=0.9, dampening=0.5))  # (dampening: the first step is its own)
    data = data if data is not None else Poisoned()
    kwargs.setdefault("cuda_graph", False)
    history = gn.fit(model, data, optimizer=opt, steps=steps, batch_size=batch_size, precision=precision,
                     progress=False, **kwargs)
    return model, opt, history, data


def host(arrays: dict) -> dict:
    return {k: gn.to_numpy(v).copy() for k, v in arrays.items()}


class Snapshots(gn.callbacks.Callback):
    """The parameters and the optimizer's state (as host copies) after every step."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.after = model, optimizer, {}

    def on_step(self, step, loss):
        state = {f"{n}/{slot}": a for n, slots in self.optimizer.state.items() for slot, a in slots.items()}
        self.after[step] = (host(self.model.params), host(state), float(loss))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(numpy.array_equal(a[k], b[k]) for k in a)


def column(history, key):
    return [record.get(key) for record in history]


# ---------------------------------------------------------------- (a) a forced overflow
def test_a_forced_overflow_is_skipped_and_training_goes_on(device):
    """The step of the poisoned batch leaves the parameters and Adam's moments bit for bit as they were,
    halves the scale and counts one skipped step in the history; it does not advance the optimizer's step
    count: the next step is Adam's step k, as a fresh Adam at step k - 1 from the same state takes it (its
    bias corrections; on a GPU from the count on the device); then the loss falls."""
    gn.manual_seed(0)
    data = Poisoned(n=512)
    model = gn.models.mlp((6, 16, 3)).to(device)
    opt = gn.optim.Adam(model, lr=1e-2)
    snaps, batches = Snapshots(model, opt), []
    original_get = data.get
    data.get = lambda indices, rng: batches.append(indices.copy()) or original_get(indices, rng)
    history = gn.fit(model, data, optimizer=opt, steps=14, batch_size=32, eval_every=1, precision="fp16",
                     progress=False, callbacks=[snaps], cuda_graph=False)
    [bad] = data.hits  # (16 batches an epoch: sample 0 in one of the 14)
    assert 1 < bad < 14, bad
    before, after = snaps.after[bad - 1], snaps.after[bad]
    assert not numpy.isfinite(after[2]) or after[2] > 1e20  # the poisoned batch's loss
    assert same(before[0], after[0]) and same(before[1], after[1])  # nothing written
    assert column(history, "skipped_steps") == [0] * (bad - 1) + [1] * (15 - bad)
    assert column(history, "loss_scale") == [2.0**16] * (bad - 1) + [2.0**15] * (15 - bad)
    assert opt.step_count == 13  # 14 attempted, 13 applied (read back from the device on a GPU)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    # step bad + 1 by hand: Adam at step_count bad - 1 (so its step bad) from the state before the skip
    twin = gn.models.mlp((6, 16, 3)).to(device)
    twin.load_state_dict(before[0])
    twin_opt = gn.optim.Adam(twin, lr=1e-2)
    twin_opt.load_state_dict(before[1], {**opt.state_dict()[1], "step": bad - 1})
    x, y = original_get(batches[bad], None)  # (the batch of step bad + 1: loop step bad counts from 0)
    with precision.using("fp16"):
        loss, grad = gn.losses.softmax_cross_entropy(twin.forward(gn.backend.to_device(x, device)),
                                                     gn.backend.to_device(y, device))
        twin.backward_params(grad * numpy.float32(2.0**15))  # (scaled and unscaled as the run did)
        for g in twin.grads.values():
            g *= numpy.float32(2.0**-15)
        twin_opt.step()
    assert same(host(twin.params), snaps.after[bad + 1][0])


# ---------------------------------------------------------------- (b) GradScaler's rule
def torch_scales(found: list[bool], growth_interval: int, init_scale: float = 2.0**16):
    """torch.amp.GradScaler("cpu") on a one-parameter SGD whose gradient is inf at the steps of found: the
    scale after each step, and which steps moved the parameter."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    scales, applied = [], []
    for bad in found:
        before = p.detach().clone()
        scaler.scale(p.sum() + 1.0).backward()
        if bad:
            p.grad.fill_(float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        applied.append(not torch.equal(before, p.detach()))
    return scales, applied


FOUND = [False] * 5 + [True] + [False] * 7 + [True, True] + [False] * 20 + [True] + [False] * 3


@pytest.mark.parametrize("growth_interval", [1, 3, 4])
def test_the_scale_follows_torch_gradscaler(growth_interval):
    """The host's rule (the CPU's scaler) against torch.amp.GradScaler on the same sequence of steps with and
    without an inf gradient: the same scale after every step, the same steps applied."""
    want, applied = torch_scales(FOUND, growth_interval)
    assert applied == [not f for f in FOUND]
    scaler = loss_scale.LossScaler(growth_interval=growth_interval)
    got = []
    for bad in FOUND:
        scaler.found = bad
        scaler.update()
        got.append(scaler.scale_value)
    assert got == want
    assert scaler.skipped == sum(FOUND) and scaler.applied == len(FOUND) - sum(FOUND)


@pytest.mark.gpu
@pytest.mark.parametrize("growth_interval", [1, 3])
def test_the_device_update_kernel_follows_the_same_rule(growth_interval):
    """loss_scale_update on the device (the emulator, on the stand-in) against the host's rule, word for word:
    the scale, the clean-step tracker, the counters and the ring of skipped flags; the found word cleared."""
    from gpunet.backend import cuda_wrappers, to_device

    reference = loss_scale.LossScaler(growth_interval=growth_interval)
    state = to_device(numpy.zeros(loss_scale.WORDS, dtype=numpy.uint32), "gpu").view("float32")
    state[loss_scale.SCALE] = 2.0**16
    for bad in FOUND * 2:
        if bad:
            state[loss_scale.FOUND] = 1.0
        cuda_wrappers.loss_scale_update(state, growth_interval, 2.0, 0.5, loss_scale.RING)
        reference.found = bad
        reference.update()
        words = gn.to_numpy(state).view(numpy.uint32)
        assert float(words[:1].view(numpy.float32)[0]) == reference.scale_value
        assert [int(words[k]) for k in (loss_scale.FOUND, loss_scale.TRACKER, loss_scale.SKIPPED, loss_scale.APPLIED,
                                        loss_scale.ATTEMPTED)] == [0, reference.tracker, reference.skipped,
                                                                   reference.applied, reference.attempted]
        assert numpy.array_equal(words[loss_scale.RING_START:].view(numpy.float32) != 0, reference.ring)


def test_the_scale_stops_growing_before_float32_overflows():
    """Grown past float32's largest power of two, the scale stays (a non-finite growth is kept out), as torch's."""
    want, _ = torch_scales([False] * 3, 1, init_scale=2.0**126)
    scaler = loss_scale.LossScaler(init_scale=2.0**126, growth_interval=1)
    got = []
    for _ in range(3):
        scaler.found = False
        scaler.update()
        got.append(scaler.scale_value)
    assert got == want == [2.0**127] * 3 and scaler.tracker == 0


def test_the_kernel_source_numbers_the_state_words_as_python():
    text = (ROOT / "kernels" / "optim.cu").read_text()
    words = {name: int(value) for name, value in re.findall(r"^#define LS_(\w+) (\d+)", text, flags=re.M)}
    assert words == {"SCALE": loss_scale.SCALE, "FOUND": loss_scale.FOUND, "TRACKER": loss_scale.TRACKER,
                     "SKIPPED": loss_scale.SKIPPED, "APPLIED": loss_scale.APPLIED, "ATTEMPTED": loss_scale.ATTEMPTED,
                     "RING": loss_scale.RING_START}


# (the kernels in the emulator, against these host rules: tests/kernels/test_emulated.py, which TSan runs too)


# ---------------------------------------------------------------- (c) growth
def test_the_scale_doubles_after_growth_interval_clean_steps(device, monkeypatch):
    """With growth_interval 3 and no overflow the scale doubles at steps 3, 6, 9; with overflows, each evaluation
    records the scale and count of GradScaler's rule applied to the steps that overflowed."""
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    *_, history, _ = run(device, steps=10, eval_every=1, data=Poisoned(poisoned=False))
    assert column(history, "loss_scale") == [2.0**16] * 2 + [2.0**17] * 3 + [2.0**18] * 3 + [2.0**19] * 2
    assert column(history, "skipped_steps") == [0] * 10
    *_, history, data = run(device, steps=24, eval_every=1, data=Poisoned(n=128))  # 4 steps an epoch
    assert len(data.hits) == 6
    rule, want = loss_scale.LossScaler(growth_interval=3), []
    for step in range(1, 25):
        rule.found = step in data.hits
        rule.update()
        want.append((rule.scale_value, rule.skipped))
    assert list(zip(column(history, "loss_scale"), column(history, "skipped_steps"))) == want


# ---------------------------------------------------------------- (d) resume
def test_a_resumed_fp16_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, device):
    """Stopped at step 9 (between overflows, in the middle of a growth interval) and resumed to 20: the weights,
    the optimizer's step count, the history (scales, skipped steps, train losses) are those of the run that
    never stopped, bit for bit on the CPU (and on the stand-in, replayed). The scale is in last.safetensors."""
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 4)
    data = Poisoned(n=160)  # 5 steps an epoch: sample 0 once in each

    def fit(out, steps, resume=False):
        return run(device, steps=steps, data=data, eval_every=3, out_dir=out, resume=resume,
                   cuda_graph=device == "gpu")

    whole, whole_opt, whole_history, _ = fit(tmp_path / "whole", 20)
    fit(tmp_path / "split", 9)
    saved = read_checkpoint(tmp_path / "split" / "last.safetensors")[2]["training"]
    assert saved["loss_scale"]["growth_tracker"] > 0 and saved["loss_scale"]["skipped_steps"] > 0
    part, part_opt, part_history, _ = fit(tmp_path / "split", 20, resume=True)
    tolerance = 0 if device == "cpu" or ON_STANDIN else 1e-5
    for name, value in host(whole.params).items():
        numpy.testing.assert_allclose(host(part.params)[name], value, rtol=tolerance, atol=tolerance, err_msg=name)
    assert whole_history[-1]["skipped_steps"] == 4
    assert part_opt.step_count == whole_opt.step_count == 20 - 4
    for key in ("step", "loss_scale", "skipped_steps"):
        assert column(part_history, key) == column(whole_history, key)
    assert column(part_history, "train_loss") == pytest.approx(column(whole_history, "train_loss"), rel=tolerance)


# ---------------------------------------------------------------- (e) CUDA graphs, and the CPU as the reference
@pytest.mark.gpu
@pytest.mark.parametrize("optimizer, accumulate, clip_norm", [("adam", 1, None), ("sgd", 1, 0.5), ("adam", 2, 0.5)])
def test_replayed_fp16_training_equals_eager(optimizer, accumulate, clip_norm):
    """Replayed steps (the scale multiply, the unscale and check, the skipped update, the scale's update all
    in the graph) equal eager steps exactly on the stand-in: weights, scales, skipped steps, losses."""
    tolerance = 0 if ON_STANDIN else 1e-5
    results = {}
    for graph in (False, True):
        said = []
        model, opt, history, _ = run("gpu", steps=20, optimizer=optimizer, batch_size=32 // accumulate,
                                     accumulate=accumulate, clip_norm=clip_norm, eval_every=5, cuda_graph=graph,
                                     log=said.append)
        assert said == []
        results[graph] = (host(model.params), history, opt.step_count)
    (eager, eager_history, eager_steps), (replayed, history, steps) = results[False], results[True]
    for name in eager:
        numpy.testing.assert_allclose(replayed[name], eager[name], rtol=tolerance, atol=tolerance, err_msg=name)
    assert column(history, "loss_scale") == column(eager_history, "loss_scale")
    assert column(history, "skipped_steps") == column(eager_history, "skipped_steps") == [0, 1, 1, 2]
    assert column(history, "train_loss") == pytest.approx(column(eager_history, "train_loss"), rel=tolerance)
    assert steps == eager_steps == 18


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer, first, graph", [("adam", False, True), ("sgd", False, True), ("sgd", True, True),
                                                     ("sgd", True, False)])
def test_the_gpu_skips_the_steps_the_cpu_skips(optimizer, first, graph):
    """The CPU is the reference: the same scales and skipped steps on the GPU, and the same steps taken. first:
    the run's first step overflows, so SGD's momentum buffer (dampening 0.5) starts at the first step applied
    (the device's count says which: the graph is captured with the buffer still fresh). The weights are
    compared loosely (20 steps of float32 kernels against NumPy: parity's bounds are tests/test_parity.py's),
    a step taken or skipped wrongly moves them by about lr, a wrong momentum start by half a step."""
    def data():
        return Poisoned(n=512, at_call=1) if first else Poisoned(n=512)

    cpu_model, cpu_opt, cpu_history, hits = run("cpu", steps=20, optimizer=optimizer, eval_every=2, clip_norm=0.5,
                                                data=data())
    gpu_model, gpu_opt, gpu_history, _ = run("gpu", steps=20, optimizer=optimizer, eval_every=2, clip_norm=0.5,
                                             cuda_graph=graph, data=data())
    assert hits.hits == ([1] if first else hits.hits) and len(hits.hits) == (1 if first else 2)
    for key in ("loss_scale", "skipped_steps"):
        assert column(gpu_history, key) == column(cpu_history, key)
    assert gpu_opt.step_count == cpu_opt.step_count == 20 - len(hits.hits)
    cpu, gpu = host(cpu_model.params), host(gpu_model.params)
    for name in cpu:
        numpy.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
def test_a_replayed_fp16_step_is_one_graph_launch_and_no_host_read(monkeypatch):
    """The scaler adds nothing around a replay: one graph launch, the batch and the record in, the loss out."""
    from gpunet.training import cuda_graph
    from tests import gpu_standin

    counts, original = [], cuda_graph.GraphedStep.run

    def counted(self, x, y):
        with gpu_standin.counting() as c:
            value = original(self, x, y)
        counts.append(c)
        return value

    monkeypatch.setattr(cuda_graph.GraphedStep, "run", counted)
    *_, history, _ = run("gpu", steps=12, cuda_graph=True, data=Poisoned(n=512))
    assert history[-1]["skipped_steps"] == 1
    assert all(c["graph_launches"] == 1 and c["raw_launches"] == 0 and c["d2h"] == 0 and c["h2d"] == 3
               and c["launches"] == 1 for c in counts[1:]), counts


# ---------------------------------------------------------------- (f) accumulation
def test_an_accumulated_step_scales_its_batches_alike_and_skips_as_one(device, monkeypatch):
    """accumulate=4: every batch of a step has its loss gradient multiplied by the same scale (it changes only
    in the update); a poisoned batch skips the whole step once, and halves the scale once."""
    seen = []
    original = loss_scale.LossScaler.scale

    def spy(self, grad):
        if not isinstance(grad, (list, tuple)):
            seen.append(self.scale_value if not self.on_device else float(gn.to_numpy(self.state)[0]))
        return original(self, grad)

    monkeypatch.setattr(loss_scale.LossScaler, "scale", spy)
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 2)
    data = Poisoned(n=256)
    *_, history, data = run(device, steps=6, batch_size=8, accumulate=4, eval_every=1, data=data)
    steps = [seen[i : i + 4] for i in range(0, len(seen), 4)]
    assert len(steps) == 6 and all(len(set(s)) == 1 for s in steps), steps
    assert column(history, "skipped_steps")[-1] == 1
    scales = [s[0] for s in steps]  # each step's scale: the record of the step before says it too
    assert scales[1:] == column(history, "loss_scale")[:-1]


# ---------------------------------------------------------------- (g) bf16 and fp32: no scaler
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_and_fp32_runs_have_no_scaler_and_diverge_on_an_overflow(device, precision, monkeypatch):
    """No scaler is made (bf16 has float32's exponent range): no records of it, the optimizer's plain kernels,
    and a poisoned batch's NaN loss is divergence, as it always was."""
    monkeypatch.setattr(loss_scale, "LossScaler", None)  # (made for fp16 alone)
    *_, history, _ = run(device, steps=4, eval_every=1, data=Poisoned(poisoned=False), precision=precision)
    assert all("loss_scale" not in r and "skipped_steps" not in r for r in history)
    model = gn.models.mlp((6, 16, 3)).to(device)
    opt = gn.optim.Adam(model, lr=1e-2)
    with pytest.raises(gn.train.TrainingDiverged, match=r"^loss became (nan|inf) at step \d+ "):
        gn.fit(model, Poisoned(n=64, factor=3e38), optimizer=opt, steps=4, batch_size=32, precision=precision,
               progress=False, cuda_graph=False)
    assert opt.loss_scaler is None


# ---------------------------------------------------------------- divergence
def test_a_collapsing_scale_is_divergence(device):
    """Every batch poisoned: every step skipped, the scale halved each time; below 2**-24 the run stops as a
    divergence, in one line (on a GPU at the first host read after it: the 25-step mark)."""
    data = Poisoned(n=64)
    data.x *= POISON
    message = (r"^fp16 loss scale underflowed to (\S+) \(below 2\*\*-24\) by step (\d+): the gradients were inf or "
               r"NaN at every scale tried \((\d+) steps skipped in all\) \(epoch \d+\); training stopped")
    with pytest.raises(gn.train.TrainingDiverged, match=message) as caught:
        run(device, steps=80, data=data, eval_every=80)  # (the host reads the GPU at steps 25 and 50)
    scale, step, skipped = re.match(message, str(caught.value)).groups()
    assert int(step) == int(skipped) == (41 if device == "cpu" else 50)
    assert scale == f"2**{16 - int(step)}"


def test_a_skipped_overflow_is_not_divergence(device):
    """Every other step overflows: each is skipped and left out of train_loss, which stays finite."""
    data = Poisoned(n=64)  # 2 steps an epoch: every other step overflows
    *_, history, _ = run(device, steps=8, data=data, eval_every=2)
    assert column(history, "skipped_steps") == [1, 2, 3, 4]
    assert all(r["train_loss"] is not None and numpy.isfinite(r["train_loss"]) for r in history)


# ---------------------------------------------------------------- data-parallel (two ranks, mpiexec)
def _rank_job(job: dict) -> dict:
    model, opt, history, _ = run(steps=10, batch_size=32, data=Poisoned(n=96), eval_every=5, clip_norm=0.5)
    return {**host(model.params), "scales": numpy.array(column(history, "loss_scale")),
            "skipped": numpy.array(column(history, "skipped_steps")), "steps": numpy.array(opt.step_count)}


def test_two_ranks_skip_the_same_steps_as_one_process(tmp_path):
    """The check runs after the all-reduce, so every rank sees the same gradients and skips the same steps:
    two ranks keep one scale sequence, the one process's, and end with its weights (to float32 rounding)."""
    pytest.importorskip("mpi4py", reason="the mpi extra (pip install -e '.[mpi]') is not installed")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (the mpich wheel of the mpi extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    job = {"result": str(tmp_path / "ranks")}
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, __file__, json.dumps(job)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    expected = _rank_job({})
    assert int(expected["skipped"][-1]) >= 1
    for rank in (0, 1):
        got = dict(numpy.load(f"{job['result']}.rank{rank}.npz"))
        for key in ("scales", "skipped", "steps"):
            assert numpy.array_equal(got[key], expected[key]), (rank, key)
        for name in expected:
            if name not in ("scales", "skipped", "steps"):
                numpy.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


if __name__ == "__main__":  # a rank of test_two_ranks_skip_the_same_steps_as_one_process
    from gpunet import distributed

    job = json.loads(sys.argv[1])
    numpy.savez(f"{job['result']}.rank{distributed.rank()}.npz", **_rank_job(job))
