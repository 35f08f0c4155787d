"""Training history: records of evaluations, written as history.json, metrics.csv and a PNG."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gpunet.checkpoint import atomic_write


class History:
    """A list of records, one per evaluation, each with at least step, epoch, train_loss and
    val_loss (and val_accuracy for classifiers)."""

    def __init__(self, records: list[dict] | None = None):
        self.records = list(records or [])

    def append(self, record: dict) -> None:
        self.records.append(record)

    def __getitem__(self, key: str) -> list:
        return [r.get(key) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def last(self) -> dict:
        return self.records[-1] if self.records else {}

    def write(self, out_dir) -> None:
        out = Path(out_dir)
        atomic_write(out / "history.json", json.dumps(self.records, indent=1).encode())
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write(out / "metrics.csv", text.getvalue().encode())

    def plot(self, path) -> None:
        """Loss curves (and validation accuracy when present) against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self["step"]
        has_acc = any(a is not None for a in self["val_accuracy"])
        fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 4), squeeze=False)
        ax = axes[0][0]
        ax.plot(steps, self["train_loss"], label="train loss")
        if any(v is not None for v in self["val_loss"]):
            ax.plot(steps, self["val_loss"], label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        if has_acc:
            axes[0][1].plot(steps, self["val_accuracy"], color="tab:green")
            axes[0][1].set_xlabel("step")
            axes[0][1].set_ylabel("val accuracy")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
