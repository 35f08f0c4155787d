"""Mixed-precision quality (issue 30, item 6): the recipes trained in fp32, bf16 and fp16 on the CPU, over seeds.

    python3 bench/precision_quality.py [--models cnn,mlp,rnn,transformer] [--seeds 0,1,2] [--json FILE]

The image recipes (mlp, cnn) run whole with `--holdout 2000` and report the held-out accuracy `gpunet train`
prints last; the character models (rnn, transformer) run `--steps 300` and report the last validation loss of
their history. One command at a time, one BLAS thread each (OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1), so
CPU times do not take each other's cores. Prints one row per run, then per model and precision the mean and
the spread over the seeds (max - min): the seed-to-seed noise the 16-bit runs are judged against.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = re.compile(r"held out: accuracy ([0-9.]+)\s+loss ([0-9.]+)")
TEXT = ("rnn", "transformer")


def run(model: str, precision: str, seed: int, out: Path) -> dict:
    folder = out / f"{model}-{precision}-seed{seed}"
    argv = ["train", "--model", model, "--precision", precision, "--seed", str(seed), "--device", "cpu",
            "--no-progress", "--out", str(folder), "--overwrite"]
    argv += ["--steps", "300"] if model in TEXT else ["--holdout", "2000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpunet", *argv], capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"gpunet {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    row = {"model": model, "precision": precision, "seed": seed, "wall_s": round(time.perf_counter() - started, 1),
           "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}
    if model in TEXT:
        history = json.loads((folder / "history.json").read_text())
        row["val_loss"] = history[-1]["val_loss"]
        row["skipped_steps"] = history[-1].get("skipped_steps")
    else:
        accuracy, loss = HELD_OUT.findall(done.stdout)[-1]
        row["held_out_accuracy"], row["held_out_loss"] = float(accuracy), float(loss)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp,rnn,transformer")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for precision in args.precisions.split(","):
                    rows.append(run(model, precision, seed, Path(out)))
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| model | precision | metric | mean | spread (max-min) | CPU s per run |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        metric = "val_loss" if model in TEXT else "held_out_accuracy"
        for precision in args.precisions.split(","):
            values = [r[metric] for r in rows if r["model"] == model and r["precision"] == precision]
            cpu = statistics.mean(r["cpu_s"] for r in rows if r["model"] == model and r["precision"] == precision)
            print(f"| {model} | {precision} | {metric} | {statistics.mean(values):.4f} | "
                  f"{max(values) - min(values):.4f} | {cpu:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
