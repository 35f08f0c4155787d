"""fit's own work around the training step, as callbacks with the hooks a user's callback has
(gpunet.training.callbacks): the schedule, the divergence watch, the progress bar, early stopping, the
checkpoints and the history files (history.json, metrics.csv, history.png: the run's CSV/JSON logger).

ordered() puts them and the user's callbacks in the one order every hook is called in
(docs/training.md): the schedule first (a step's record keeps the rate it was taken with), the
divergence watch before anything reads the step's loss, early stopping and the user's callbacks
before the checkpoint (so last.safetensors holds their state after the evaluation), the history
files last.
"""
from __future__ import annotations

import numpy
from tqdm.auto import tqdm

from gpunet.training import checkpoint
from gpunet.training.callbacks import Callback, EarlyStopping, Events
from gpunet.training.divergence import DivergenceWatch
from gpunet.training.loss_scale import RING
from gpunet.losses import item


class ScheduleStep(Callback):
    """The learning-rate schedule advances once per optimizer step (after noting the rate the step used)."""

    def __init__(self, run):
        self.run = run

    def on_step(self, step: int, loss) -> None:
        self.run.step_lr = self.run.optimizer.lr
        if self.run.schedule is not None:
            self.run.schedule.step()


class DivergenceCheck(Callback):
    """Keeps each step's loss (on a GPU a device-side record: no wait) and, where the host reads the
    loss anyway (run.host_reads: every step on the CPU, every 25 on a GPU and before each evaluation),
    raises TrainingDiverged at the first step whose loss was not finite, before an evaluation sees its weights.
    In fp16 (run.scaler) a step the loss scaler skipped is no divergence, whatever its loss, but a scale that
    fell below 2**-24 is (every scale overflowed); and the running train loss is summed here, on the host,
    from the finite losses read (a skipped step's may be inf)."""

    def __init__(self, run):
        self.run, self.watch = run, DivergenceWatch(run.setup.device.xp, on_read=self._read)

    def on_step(self, step: int, loss) -> None:
        self.watch.observe(loss, step)
        if self.run.host_reads or (self.run.scaler is not None and self.watch.pending >= RING):
            # the host waits for the step here (device-side errors raise too); later callbacks (the
            # progress bar) take this value instead of reading the device again
            self.run.host_loss = item(loss)
            self.check()

    def check(self) -> None:
        self.run.check_finite(self.watch)
        scaler, s = self.run.scaler, self.run.state
        if scaler is not None and (why := scaler.underflowed(s.step)) is not None:
            self.run.history.append({"step": s.step, "epoch": s.epoch + 1, "train_loss": None, "val_loss": None,
                                     **scaler.record(), "diverged": True})
            self.run._diverged(why)

    def _read(self, steps, losses):
        """The watch's read of steps' losses (float64): with a scaler, which were skipped, and the finite
        ones added to the running train loss in step order."""
        scaler = self.run.scaler
        if scaler is None:
            return None
        s = self.run.state
        for value in losses[numpy.isfinite(losses)]:
            s.running, s.running_count = s.running + float(value), s.running_count + 1
        return scaler.skipped_at(steps)


class Progress(Callback):
    """The tqdm bar of the steps (rank 0 only; progress=None: when the output is a terminal)."""

    def __init__(self, run, progress: bool | None):
        self.run, self.bar = run, None
        self.disable = (None if progress is None else not progress) if run.setup.writes else True

    def on_train_begin(self) -> None:
        self.bar = tqdm(total=self.run.planned_steps(), initial=self.run.state.step, unit="step",
                        dynamic_ncols=True, disable=self.disable)

    def on_step(self, step: int, loss) -> None:
        self.bar.update(1)
        if self.run.host_reads and not self.disable:
            self.bar.set_postfix(loss=f"{self.run.host_loss:.4f}", refresh=False)

    def on_train_end(self) -> None:
        self.bar.close()


class Checkpoint(Callback):
    """The best model (model.safetensors, at the lowest monitored loss) and last.safetensors (what a resume
    needs, the callbacks' states included) at every evaluation; without a run folder only the best is noted."""

    def __init__(self, run):
        self.run = run

    def on_evaluation(self, record: dict) -> None:
        run, s = self.run, self.run.state
        improved = record[run.monitor] is not None and record[run.monitor] < s.best_loss  # (None: fp16 overflowed)
        if improved:
            s.best_loss, s.best_step = record[run.monitor], s.step
        if run.out is not None:
            if improved:
                checkpoint.save(run.model, run.out / "model.safetensors",
                                extra_metadata={"training_precision": run.precision})  # (its weights: float32)
                run.written.append(run.out / "model.safetensors")
            run.save_last()


class HistoryFiles(Callback):
    """The run's logger: history.json and metrics.csv after every evaluation, and history.png at the end."""

    def __init__(self, run):
        self.run = run

    def on_evaluation(self, record: dict) -> None:
        if self.run.out is not None:
            self.run.history.write(self.run.out)

    def on_train_end(self) -> None:
        run = self.run
        if run.out is not None:
            run.written += run.history.write(run.out)
            if len(run.history) and run.history.save_plot(run.out / "history.png"):
                run.written.append(run.out / "history.png")


def ordered(run, user: list, progress: bool | None, early_stopping: int | None) -> Events:
    """The built-in callbacks and the user's, in the order their hooks are called (module docstring)."""
    stopping = [EarlyStopping(early_stopping)] if early_stopping is not None else []
    for callback in stopping:
        callback.of_fit = True  # fit's early_stopping: an older run counted it in its LoopState (Run.restore_callbacks)
    return Events([ScheduleStep(run), DivergenceCheck(run), Progress(run, progress), *stopping, *user,
                   Checkpoint(run), HistoryFiles(run)])
