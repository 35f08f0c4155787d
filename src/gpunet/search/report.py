"""What a search writes besides its trials' run folders: DIR/trials.csv, DIR/best/ (the best
trial's model.safetensors, history.json and trial.json, each copied atomically) and DIR/trials.png."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gpunet.files import atomic_write

BEST_FILES = ("model.safetensors", "history.json")


def rows(finished: dict, space: dict) -> list[dict]:
    """One row per finished trial, by trial number."""
    table = []
    for number in sorted(finished):
        t = finished[number]
        a = t.user_attrs
        state = "diverged" if a.get("diverged") else t.state.name.lower()
        row = {"trial": number, "state": state, **{name: t.params.get(name, value) for name, value in space.items()
                                                    if not isinstance(value, dict) or name in t.params}}
        row.update({"val_loss": a.get("val_loss"), "val_accuracy": a.get("val_accuracy"),
                    "best_step": a.get("best_step"), "steps": a.get("steps"), "seconds": a.get("seconds"),
                    "folder": f"trials/trial-{number:03d}"})
        table.append(row)
    return table


def best(table: list[dict]) -> dict | None:
    """The completed trial of the lowest selection loss (a pruned trial stopped early, so it is not a candidate)."""
    complete = [r for r in table if r["state"] == "complete" and r["val_loss"] is not None]
    return min(complete, key=lambda r: (r["val_loss"], r["trial"])) if complete else None


def write(out: Path, finished: dict, space: dict, classifier: bool) -> list[dict]:
    table = rows(finished, space)
    text = io.StringIO()
    fields = list(dict.fromkeys(k for r in table for k in r)) or ["trial", "state"]
    if not classifier and "val_accuracy" in fields:
        fields.remove("val_accuracy")
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write(out / "trials.csv", text.getvalue().encode())
    top = best(table)
    if top is not None:
        _copy_best(out, top)
    _plot(out / "trials.png", table, top, classifier)
    return table


def _copy_best(out: Path, top: dict) -> None:
    """DIR/best/: the best trial's files, unless they are already there (trial.json says which trial)."""
    target = out / "best"
    try:
        current = json.loads((target / "trial.json").read_text())
    except (OSError, ValueError):
        current = None
    if current == top and all((target / name).exists() for name in BEST_FILES):
        return
    source = out / top["folder"]
    for name in BEST_FILES:
        atomic_write(target / name, (source / name).read_bytes())
    atomic_write(target / "trial.json", json.dumps(top, indent=1).encode())  # last: names the files above


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(path: Path, table: list[dict], top: dict | None, classifier: bool) -> None:
    """The selection metric per trial; pruned trials as crosses (nothing without matplotlib)."""
    if not can_plot():
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = "val_accuracy" if classifier else "val_loss"
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray")):
        chosen = [r for r in table if r["state"] == state and r.get(key) is not None]
        ax.scatter([r["trial"] for r in chosen], [r[key] for r in chosen], marker=marker, color=color,
                   label=f"{state} ({len(chosen)})")
    if top is not None and top.get(key) is not None:
        ax.scatter([top["trial"]], [top[key]], marker="*", s=200, color="tab:red", label=f"best: trial {top['trial']}")
    ax.set_xlabel("trial")
    ax.set_ylabel(("best validation accuracy" if classifier else "best validation loss (nats/char)")
                  + " on the selection split")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=3, fontsize="small", frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def progress_line(number: int, total: int, params: dict, outcome, table: list[dict]) -> str:
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    shown = " ".join(f"{k}={fmt(v)}" for k, v in params.items())
    if outcome.val_loss is None:
        result = outcome.state
    else:
        result = f"val_loss {outcome.val_loss:.4f}" + (f" acc {outcome.val_accuracy:.4f}" if outcome.val_accuracy
                                                          is not None else "")
        result += " (pruned)" if outcome.state == "pruned" else ""
    top = best(table)
    lead = f"; best so far: trial {top['trial']}" if top else ""
    return (f"trial {number} ({number + 1}/{total}): {shown} -> {result}, {outcome.steps} steps, "
            f"{outcome.seconds:.1f} s{lead}")

