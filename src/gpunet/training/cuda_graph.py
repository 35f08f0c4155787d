"""fit's training step captured once as a CUDA graph and replayed: one launch per step instead
of one per kernel (fit(cuda_graph=True), `gpunet train --cuda-graph`).

A graph replays its kernels with the arguments and memory they had at capture, so everything a
step changes lives in memory the graph owns or reads: the batch goes into static device buffers
before each replay, and a 16-byte record written before each replay holds the rest: the
optimizer's per-step scalars (learning rate, Adam's bias corrections: Optimizer.step_scalars) and
the step number the dropout kernels draw their masks from (gpunet.random.step_from_device: the
run's RandomState hands them the record's step word while a step is captured).
Memory the capture allocates comes from a pool of the graph's own, so nothing else is ever given
an address the graph writes. Each batch shape gets its own graph, at most two per run (the full
batch and a short last one); a third shape, or a step that cannot be captured, runs eagerly, and
the reason is said in one line.

With gradient accumulation (gpunet.training.accumulate) a step is several batches and one update, so
they are captured apart: a graph per batch shape of a batch's work (forward, loss, backward and the add
into the step's sums), whose record holds the batch's share of the step's samples in word 0 (its
graph runs no optimizer) and its random step in word 3, and one graph of the update (the sums into the
gradient buffers, clipping, the optimizer), whose record is a step's. A step of N batches is then N + 1
graph launches.

In fp16 the loss scaler's state (gpunet.training.loss_scale) is one device array the captured kernels read
and write in place: the scale the loss gradient is multiplied by, the found flag unscale_check sets and the
optimizer's kernels read (a skipped step is skipped in the replay too), the counters and the ring of skipped
flags that loss_scale_update keeps. The record's bias corrections go unread then (Adam's step is the state's
applied count); the host's step_count counts replays until the scaler's next host read corrects it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy

from gpunet import random
from gpunet.backend import is_cupy_array, ops_for_device
from gpunet.layers import inputs as arrays

MAX_GRAPHS = 2
RECORD_WORDS = 4  # the per-step record: float32 optimizer scalars in words 0..2, the uint32 step in word 3
STEP_WORD = 3
WEIGHT_WORD = 0  # an accumulated batch's record: its share of the step's samples (float32)
UPDATE = ("update",)  # the key of an accumulated step's update graph


def why_not(model, optimizer, world_size: int = 1) -> str | None:
    """Why the step of this model cannot be captured (one line), or None when it can."""
    if model.device != "gpu":
        return f"the model is on the {model.device}, and CUDA graphs need a GPU"
    if world_size > 1:
        return "data-parallel training all-reduces through MPI, which a graph cannot capture"
    dtypes = {str(p.dtype) for p in model.params.values()}
    if dtypes != {"float32"}:
        return f"its parameters are {', '.join(sorted(dtypes))}; only float32 kernels read their per-step scalars " \
               "from the device"
    if not getattr(optimizer, "reads_device_scalars", False):
        return f"the optimizer {type(optimizer).__name__} takes its learning rate as a kernel argument, which a " \
               "replay would freeze"
    return None


def step_record(step_scalars, step: int, groups=()):
    """The host side of a replay's record: the optimizer's scalars, then the step as a uint32 word,
    then the scalars of each of its parameter groups (STEP_WORD words each, after the step's)."""
    record = numpy.zeros(RECORD_WORDS + STEP_WORD * len(groups), dtype="float32")
    starts = [0] + [RECORD_WORDS + STEP_WORD * k for k in range(len(groups))]
    for start, scalars in zip(starts, [step_scalars, *groups]):
        if len(scalars) > STEP_WORD:
            raise ValueError(f"cuda graph: an optimizer's step_scalars hold at most {STEP_WORD} values, got "
                             f"{len(scalars)}")
        record[start : start + len(scalars)] = scalars
    record.view("uint32")[STEP_WORD] = step % 2**32  # (the counter's step word: the kernels take 32 bits)
    return record


def _arrays(value) -> list:
    """The device arrays in value, looking one level into dicts, lists, tuples and namespaces."""
    if hasattr(value, "__cuda_array_interface__") or is_cupy_array(value):
        return [value]
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif hasattr(value, "__dict__") and type(value).__name__ == "SimpleNamespace":
        items = vars(value).values()
    else:
        return []
    return [item for item in items if is_cupy_array(item)]


def _layers(layer):
    yield layer
    for _, child in layer.children():
        yield from _layers(child)


@dataclass
class _Captured:
    x: object  # the static input buffers a replay reads
    y: object
    loss: object  # where a replay writes the step's loss
    graph: object
    keep: list  # every array the layers held after the capture: memory the graph's kernels read or write
    range_checks: set  # the range-error flags the captured step folds bad labels and ids into (see run)


class GraphedStep:
    """Runs device_step(x, y) -> loss (x, y raw batches on the device) through CUDA graphs.

    device_step must be the whole step (forward, loss, backward, clipping, optimizer.step()) and
    touch the host for nothing: a copy inside a capture is an error, and the step then falls back
    to eager with the reason in `log`. With update (gradient accumulation), device_step(x, y, weight)
    is one batch's work, weight its share of the step's samples (run(x, y, weight)), and update() the
    step's update after its batches (run_update())."""

    def __init__(self, device_step, optimizer, log=print, update=None):
        self.device_step, self.optimizer, self.log, self.update = device_step, optimizer, log, update
        self.ops = ops_for_device("gpu")
        self.xp = self.ops.xp
        self.graphs: dict[tuple, _Captured] = {}
        groups = len(getattr(optimizer, "groups", ()))  # parameter groups: their scalars follow the step word
        self.record = self.xp.zeros(RECORD_WORDS + STEP_WORD * groups, dtype="float32")  # one copy per replay
        self.scalars = self.record[:STEP_WORD]  # what the optimizer's kernels read
        if groups:  # (one slice per group tag, the optimizer's own first)
            self.scalars = [self.scalars] + [self.record[RECORD_WORDS + STEP_WORD * k:][:STEP_WORD]
                                             for k in range(groups)]
        self.step = self.record.view("uint32")[STEP_WORD : STEP_WORD + 1]  # what the dropout kernels read
        self.weight = self.record[WEIGHT_WORD : WEIGHT_WORD + 1]  # an accumulated batch's share of its step
        self.pool = self.xp.cuda.MemoryPool()  # the captures' own memory
        self.active = True
        self._said_too_many = False

    def run(self, x, y, weight: float | None = None):
        """One training step on host batches x, y (with accumulation: one batch of a step, weight its share
        of the step's samples); returns its loss (a fresh device scalar)."""
        key = (_shapes(x), _shapes(y))
        captured = self.graphs.get(key)
        if captured is None:
            return self._first(key, x, y, weight)
        for static, batch in zip(_listed(captured.x) + _listed(captured.y), _listed(x) + _listed(y)):
            static.set(numpy.ascontiguousarray(batch))
        if self.update is None:
            self._replay(captured, self._step_record())
        else:  # (the words of the optimizer's scalars are free: its graph runs no update)
            self._replay(captured, step_record([weight], random.current_step(), [()] * len(self._tags())), False)
        return captured.loss.copy()  # (the next replay overwrites the graph's own)

    def run_update(self) -> None:
        """With accumulation: the update of a step whose batches ran (run(x, y, weight))."""
        captured = self.graphs.get(UPDATE)
        if captured is not None:
            self._replay(captured, self._step_record())
            return
        self.update()  # the first: eager (the warm-up), then captured
        self._try(UPDATE, lambda: self._capture(None, None))

    def _tags(self) -> range:
        return range(1, 1 + len(getattr(self.optimizer, "groups", ())))

    def _step_record(self):
        return step_record(self.optimizer.step_scalars(), random.current_step(),
                           [self.optimizer.step_scalars(tag) for tag in self._tags()])

    def _replay(self, captured, record, steps: bool = True) -> None:
        self.record.set(record)
        captured.graph.launch()
        if steps:
            self.optimizer.step_count += 1  # the host's count of what the replay did
        self.ops._unchecked |= captured.range_checks  # a replay runs no Python: mark its flags to be read

    def _first(self, key, x, y, weight=None):
        """A shape not seen yet: an eager step on new static buffers (the step itself, and the
        warm-up: kernels compiled, optimizer state made), then, if a graph may be added, its capture."""
        extra = () if self.update is None else (weight,)
        if len(self.graphs) - (UPDATE in self.graphs) >= MAX_GRAPHS:
            if not self._said_too_many:
                self.log(f"cuda graph: a batch of shape {_shapes(x)[0][0]} runs eagerly: a run keeps at most "
                         f"{MAX_GRAPHS} graphs (drop the last batch, or keep the batch size fixed)")
                self._said_too_many = True
            return self.device_step(self._on_device(x), self._on_device(y), *extra)
        static_x, static_y = self._on_device(x), self._on_device(y)
        loss = self.device_step(static_x, static_y, *extra)
        self._try(key, lambda: self._capture(static_x, static_y))
        return loss

    def _on_device(self, batch):
        """A host batch (an array, or a list of them for several inputs or outputs) as new device arrays."""
        return arrays.each(lambda a: self.xp.asarray(numpy.ascontiguousarray(a)), batch)

    def _try(self, key, capture) -> None:
        try:
            self.graphs[key] = capture()
        except Exception as exc:  # noqa: BLE001 - any failure to capture means: train eagerly, and say why
            self.active = False
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.log(f"cuda graph: off, training eagerly: the step could not be captured ({reason})")

    def _capture(self, x, y) -> _Captured:
        """The step captured on the static batch x, y (x None: an accumulated step's update)."""
        stream = self.xp.cuda.Stream(non_blocking=True)
        optimizer, steps = self.optimizer, self.optimizer.step_count
        optimizer.device_scalars = self.scalars  # the captured update reads them from the device
        self.ops._unchecked.clear()
        random.set_step(random.current_step())  # the warm-up step ran its dropouts: count the captured ones from draw 0
        if x is None:
            work = self.update
        elif self.update is None:
            work = lambda: self.device_step(x, y)  # noqa: E731
        else:
            work = lambda: self.device_step(x, y, self.weight)  # noqa: E731
        try:
            with self.xp.cuda.using_allocator(self.pool.malloc), stream, random.step_from_device(self.step):
                stream.begin_capture()
                try:
                    loss = work()
                except BaseException:
                    try:  # (CUDA reports the capture invalidated: the step's own error is the one to say)
                        stream.end_capture()
                    except Exception:  # noqa: BLE001
                        pass
                    raise
                graph = stream.end_capture()
        finally:
            optimizer.device_scalars = None  # eager steps take their scalars as arguments again
            optimizer.step_count = steps  # a capture runs nothing: no step was taken
        # The layers' work buffers (a recurrent layer's, kept between calls) are in the graph: a layer that
        # later replaces one (another batch size) must not free memory a replay still writes.
        keep = [_arrays(vars(layer)) for layer in _layers(optimizer.model)]
        return _Captured(x, y, loss, graph, keep, set(self.ops._unchecked))


def _listed(batch) -> list:
    return batch if isinstance(batch, list) else [batch]


def _shapes(batch) -> tuple:
    """A batch's key: each array's shape and dtype (one array, or a list of them)."""
    return tuple((a.shape, str(a.dtype)) for a in _listed(batch))
