"""fit(cuda_graph=True): the step captured once per batch shape and replayed. On the CuPy stand-in a
capture runs nothing and records every kernel with its arguments and memory, as CUDA does, and a
replay runs them again: so replayed training must equal eager training exactly, a per-step value
frozen into the graph (the learning rate, Adam's step) shows up as a difference, and a host read
inside the step makes the capture fail. On a real GPU the same tests compare within float32 rounding."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from tests import gpu_standin
from tests.support.arrays import ON_STANDIN

pytestmark = pytest.mark.gpu
TOLERANCE = 0 if ON_STANDIN else 1e-5


def data(n=200, seed=0):
    r = numpy.random.default_rng(seed)
    return r.random((n, 784), dtype=numpy.float32), r.integers(0, 10, n)


def train(cuda_graph, *, steps=12, batch_size=64, schedule=False, optimizer="adam", clip_norm=None, model=None):
    gn.manual_seed(0)
    model = (model() if model else gn.models.mlp((784, 32, 10))).to("gpu")
    opt = gn.optim.Adam(model, lr=1e-2) if optimizer == "adam" else gn.optim.SGD(model, lr=0.1, momentum=0.9)
    sched = gn.optim.CosineLR(opt, t_max=steps, warmup=3) if schedule else None
    said = []
    history = gn.fit(model, data(), optimizer=opt, steps=steps, batch_size=batch_size, schedule=sched,
                     clip_norm=clip_norm, progress=False, cuda_graph=cuda_graph, log=said.append)
    return {k: gn.to_numpy(v) for k, v in model.params.items()}, history, said


def assert_same(a, b):
    for name in a:
        numpy.testing.assert_allclose(a[name], b[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("optimizer, schedule, clip_norm", [("adam", False, None), ("adam", True, 0.5),
                                                             ("sgd", True, None)])
def test_replayed_training_equals_eager_training(optimizer, schedule, clip_norm):
    """200 samples in batches of 64: three full batches and a short one of 8 per epoch, so both of
    the run's graphs replay; a cosine schedule changes the rate every step, Adam its bias corrections."""
    eager, eager_history, _ = train(False, optimizer=optimizer, schedule=schedule, clip_norm=clip_norm)
    replayed, history, said = train(True, optimizer=optimizer, schedule=schedule, clip_norm=clip_norm)
    assert said == []
    assert_same(replayed, eager)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=TOLERANCE, abs=TOLERANCE)


@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
def test_a_replayed_step_is_one_graph_launch_on_its_static_buffers(monkeypatch):
    from gpunet.training import cuda_graph

    made = []
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture",
                        lambda self, x, y, original=cuda_graph.GraphedStep._capture: made.append(x.shape)
                        or original(self, x, y))
    counts = []
    original_run = cuda_graph.GraphedStep.run

    def counted(self, x, y):
        with gpu_standin.counting() as c:
            value = original_run(self, x, y)
        counts.append((x.shape[0], c))
        return value

    monkeypatch.setattr(cuda_graph.GraphedStep, "run", counted)
    train(True, steps=9)
    assert made == [(64, 784), (8, 784)]  # one graph per batch shape: the full batch, the short last one
    replays = [c for n, c in counts[1:] if n == 64][1:]  # after the first step of each shape
    assert replays and all(c["graph_launches"] == 1 and c["raw_launches"] == 0 and c["d2h"] == 0 for c in replays)
    # the batch and the optimizer's scalars go in through static buffers; the loss out through one copy
    assert all(c["h2d"] == 3 and c["launches"] == 1 for c in replays), replays


@pytest.mark.skipif(not ON_STANDIN, reason="counts graphs on the CuPy stand-in")
def test_a_third_batch_shape_runs_eagerly_and_says_so():
    from gpunet.training import cuda_graph

    said = []
    model = gn.models.mlp((784, 16, 10)).to("gpu")
    graphed = cuda_graph.GraphedStep(lambda x, y: _step(model, opt, x, y), opt := gn.optim.SGD(model, lr=0.1),
                                     said.append)
    x, y = data(100)
    for n in (10, 10, 20, 20, 30, 30):
        graphed.run(x[:n], y[:n])
    assert len(graphed.graphs) == 2 and graphed.active
    assert said == ["cuda graph: a batch of shape (30, 784) runs eagerly: a run keeps at most 2 graphs (drop the "
                    "last batch, or keep the batch size fixed)"]


def test_the_capture_allocates_from_the_graphs_own_pool_and_a_replay_allocates_nothing():
    """cupy.cuda.using_allocator routes what the captured step allocates to GraphedStep.pool (on the
    stand-in as in CuPy; it did nothing before issue 27), so nothing else gets an address a replay writes."""
    from gpunet.training import cuda_graph

    model = gn.models.mlp((784, 16, 10)).to("gpu")
    opt = gn.optim.SGD(model, lr=0.1)
    graphed = cuda_graph.GraphedStep(lambda x, y: _step(model, opt, x, y), opt, print)
    x, y = data(100)
    graphed.run(x[:10], y[:10])  # an eager step (default memory), then the capture (the pool's)
    assert len(graphed.graphs) == 1 and graphed.active
    captured = graphed.pool.total_bytes()
    assert captured >= 10 * 16 * 4  # at least the hidden activations of the captured forward
    for _ in range(3):
        graphed.run(x[:10], y[:10])
    assert graphed.pool.total_bytes() == captured


def _step(model, opt, x, y):
    loss, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
    model.backward_params(grad)
    opt.step()
    return loss


def test_a_model_with_dropout_replays_as_it_trains_eagerly():
    """Each replay draws new masks: the dropout kernels read the step from the graph's record, which
    a replay writes first (a step frozen at capture would repeat the first replay's masks)."""
    def model():
        return gn.Sequential(gn.layers.Dense(784, 16), gn.layers.ReLU(), gn.layers.Dropout(0.2), gn.layers.Dense(16, 10))

    eager, eager_history, _ = train(False, steps=9, model=model)
    replayed, history, said = train(True, steps=9, model=model)
    assert said == []
    assert_same(replayed, eager)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=TOLERANCE, abs=TOLERANCE)


def test_the_record_holds_the_optimizer_scalars_then_the_step():
    from gpunet.training.cuda_graph import step_record

    record = step_record([0.5, 0.25, 0.125], 2**32 + 7)
    assert record.dtype == numpy.float32 and list(record[:3]) == [0.5, 0.25, 0.125]
    assert record.view(numpy.uint32)[3] == 7  # the step word of the dropout counter: the low 32 bits
    with pytest.raises(ValueError, match="at most 3 values, got 4"):
        step_record([1.0, 2.0, 3.0, 4.0], 0)


@pytest.mark.skipif(not ON_STANDIN, reason="the stand-in refuses a host read inside a capture as CUDA does")
def test_a_step_that_reads_the_host_falls_back_to_eager_and_trains_the_same(monkeypatch):
    from gpunet.layers import Dropout

    forward = Dropout.forward

    def peeking(self, x, *args, **kwargs):
        float(x.max())  # a host read inside the step: a capture cannot hold it
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(Dropout, "forward", peeking)  # (a rate of 0: no mask, so a graph could replay it)
    def model():
        return gn.Sequential(gn.layers.Dense(784, 16), gn.layers.ReLU(), gn.layers.Dropout(0.0), gn.layers.Dense(16, 10))

    eager, _, _ = train(False, steps=4, model=model)
    replayed, _, said = train(True, steps=4, model=model)
    assert said == ["cuda graph: off, training eagerly: the step could not be captured "
                    "(cudaErrorStreamCaptureUnsupported: a device-to-host copy while a stream is capturing a graph)"]
    assert_same(replayed, eager)


def test_a_cpu_model_says_why_there_is_no_graph():
    said = []
    model = gn.models.mlp((784, 8, 10))
    gn.fit(model, data(20), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, progress=False, cuda_graph=True,
           log=said.append)
    assert said == ["cuda graph: off, training eagerly: the model is on the cpu, and CUDA graphs need a GPU"]


@pytest.mark.parametrize("flag, replays", [([], True), (["--cuda-graph"], True), (["--no-cuda-graph"], False)])
def test_the_train_command_replays_on_a_gpu_unless_told_not_to(tmp_path, capsys, monkeypatch, flag, replays):
    from gpunet.training import cuda_graph
    from gpunet.cli import main

    runs = []
    monkeypatch.setattr(cuda_graph.GraphedStep, "run", lambda self, x, y, original=cuda_graph.GraphedStep.run:
                        runs.append(x.shape) or original(self, x, y))
    argv = ["train", "--device", "gpu", "--steps", "3", "--batch-size", "16", "--no-progress"]
    assert main(argv + flag + ["--out", str(tmp_path / "run")]) == 0  # (the default MLP has dropout)
    assert "cuda graph" not in capsys.readouterr().out
    assert runs == ([(16, 28, 28)] * 3 if replays else [])  # raw images: the model flattens them


def test_a_cpu_run_does_not_mention_graphs_unless_asked():
    said = []
    model = gn.models.mlp((784, 8, 10))
    gn.fit(model, data(20), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, progress=False, log=said.append)
    assert not any("cuda graph" in line for line in said)


def test_a_bad_label_in_a_replayed_step_is_reported_as_in_an_eager_one():
    """A replay runs no Python: the label-error flags its loss kernel folds into are marked for reading
    after each replay, so a label out of range raises at the next read, as eagerly."""
    x, y = data(64)
    y = y % 4
    y[40] = 7  # in the third batch of 16: a replayed step
    model = gn.Sequential(gn.layers.Dense(784, 8), gn.layers.ReLU(), gn.layers.Dense(8, 4)).to("gpu")
    with pytest.raises(ValueError, match="label 7 is out of range for 4 classes"):
        gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=0.1), steps=4, batch_size=16, progress=False,
               cuda_graph=True)


@pytest.mark.parametrize("build", [lambda: gn.models.char_rnn(12, embedding_dim=4, hidden_size=8),
                                   lambda: gn.models.transformer(12, context=5, d_model=8, num_heads=2, num_layers=1,
                                                                 dropout=0.1)], ids=["lstm", "transformer-dropout"])
def test_a_sequence_model_replays_as_it_trains_eagerly(build):
    """An LSTM keeps work buffers between calls, and the graph keeps those it captured alive; a
    transformer block's dropout is fused with its residual add."""
    r = numpy.random.default_rng(1)
    ids = r.integers(0, 12, (40, 6))

    def run(cuda_graph):
        gn.manual_seed(0)
        model = build().to("gpu")
        gn.fit(model, (ids[:, :-1], ids[:, 1:]), optimizer=gn.optim.Adam(model, lr=1e-2), steps=6, batch_size=16,
               progress=False, cuda_graph=cuda_graph)
        return {k: gn.to_numpy(v) for k, v in model.params.items()}

    assert_same(run(True), run(False))


def test_an_optimizer_that_passes_its_rate_as_an_argument_keeps_training_eager():
    class Plain(gn.optim.SGD):
        reads_device_scalars = False  # as a user's optimizer whose _update ignores device_scalars

    said = []
    model = gn.models.mlp((784, 8, 10)).to("gpu")
    gn.fit(model, data(20), optimizer=Plain(model, lr=0.1), steps=1, progress=False, cuda_graph=True,
           log=said.append)
    assert said == ["cuda graph: off, training eagerly: the optimizer Plain takes its learning rate as a kernel "
                    "argument, which a replay would freeze"]
