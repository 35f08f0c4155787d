"""Training history: records of evaluations, written as history.json, metrics.csv and a PNG.

history.json is strict JSON: a value that is not a finite number is written as null and its
record is marked "diverged": true.
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, overload

from gpunet import extras
from gpunet.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def strict_record(record: dict) -> dict:
    """The record with NaN/Inf replaced by None, and "diverged": True when there were any."""
    out, bad = {}, False
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value, bad = None, True
        out[key] = value
    if bad:
        out["diverged"] = True
    return out


def strict_json(value, **kwargs) -> str:
    """json.dumps that never writes NaN or Infinity (they become null)."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class History:
    """A list of records, one per evaluation, each with at least step, epoch, train_loss and
    val_loss (and val_accuracy for classifiers). As a list: history[i] and history[-1] are
    records (dicts), history[a:b] a list of them, `for record in history` goes through them;
    history["val_loss"] is a column: that entry of every record (None where a record lacks it)."""

    def __init__(self, records: list[dict] | None = None):
        self.records = list(records or [])

    def append(self, record: dict) -> None:
        self.records.append(record)

    @overload
    def __getitem__(self, key: str) -> list: ...
    @overload
    def __getitem__(self, key: int) -> dict: ...
    @overload
    def __getitem__(self, key: slice) -> list[dict]: ...

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r.get(key) for r in self.records]
        if isinstance(key, slice) or (isinstance(key, numbers.Integral) and not isinstance(key, bool)):
            try:
                return self.records[key]
            except IndexError:
                raise IndexError(f"History: record {key} is out of range; it holds {len(self.records)} "
                                 f"record{'' if len(self.records) == 1 else 's'}") from None
        raise TypeError(f"History: index with a record number (history[-1]), a slice or an entry's name "
                        f"(history['val_loss']), got {type(key).__name__}")

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def last(self) -> dict:
        return self.records[-1] if self.records else {}

    def write(self, out_dir) -> list[Path]:
        """history.json (strict JSON) and metrics.csv, atomically; returns their paths."""
        out = Path(out_dir)
        records = [strict_record(r) for r in self.records]
        atomic_write(out / "history.json", json.dumps(records, indent=1, allow_nan=False).encode())
        keys = list(dict.fromkeys(k for r in records for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
        atomic_write(out / "metrics.csv", text.getvalue().encode())
        return [out / "history.json", out / "metrics.csv"]

    def plot(self, path: str | os.PathLike[str] | None = None, *, inline: bool = False) -> Figure:
        """Loss curves (and validation accuracy when present) against the step: written to path as
        a PNG (atomically) when given, shown in the notebook when inline=True, and returned as a
        Figure of its own. matplotlib's global backend and state are untouched (no pyplot)."""
        fig = self.figure()
        if path is not None or inline:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            if path is not None:
                atomic_write(path, buffer.getvalue())
            if inline:
                _show_inline(buffer.getvalue())
        return fig

    def save_plot(self, path: str | os.PathLike[str], log: Callable[[str], object] = print) -> bool:
        """plot(path), or one line saying why not when matplotlib (the `plot` extra) is missing."""
        if not has_matplotlib():
            log(f"{Path(path).name} skipped: matplotlib is not installed (pip install 'gpunet[plot]')")
            return False
        self.plot(path)
        return True

    def figure(self) -> Figure:
        """The plot as a matplotlib Figure of its own; a single evaluation is drawn as points."""
        if not has_matplotlib():
            raise ImportError("History.figure: matplotlib is not installed (pip install 'gpunet[plot]')")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = self["step"]
        style = {"marker": "o"} if len(steps) < 2 else {}
        has_acc = any(a is not None for a in self["val_accuracy"])
        fig = Figure(figsize=(10 if has_acc else 5, 4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)
        ax = axes[0][0]
        ax.plot(steps, _floats(self["train_loss"]), label="train loss", **style)
        if any(v is not None for v in self["val_loss"]):
            ax.plot(steps, _floats(self["val_loss"]), label="val loss", **style)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        if has_acc:
            axes[0][1].plot(steps, _floats(self["val_accuracy"]), color="tab:green", **style)
            axes[0][1].set_xlabel("step")
            axes[0][1].set_ylabel("val accuracy")
        fig.tight_layout()
        return fig


def _floats(values) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def has_matplotlib() -> bool:
    """Whether matplotlib (the `plot` extra) can be imported; it is imported only when drawing."""
    return extras.present("matplotlib")


def _show_inline(png: bytes) -> None:
    """Show a PNG in the notebook (IPython's display), whatever matplotlib backend is selected."""
    try:
        from IPython.display import Image, display
    except ImportError:
        raise ImportError("History.plot(inline=True): IPython is not installed; it shows plots in a notebook "
                          "(pass a path to write a PNG instead)") from None
    display(Image(data=png, format="png"))
