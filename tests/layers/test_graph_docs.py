"""docs/layers.md's graph-model examples: shown whole on the page, and they run as shown."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(name):
    example = ROOT / "docs" / "examples" / name
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "layers.md").read_text(encoding="utf-8"), flags=re.S)
    assert example.read_text(encoding="utf-8") in blocks, f"docs/layers.md shows docs/examples/{name} whole"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def losses(line):
    first, last = re.search(r"train loss ([0-9.]+) -> ([0-9.]+)$", line).groups()
    return float(first), float(last)


def test_the_graph_models_example_runs_and_trains():
    lines = run("graph_models.py")
    assert lines[0] == "['stem.weight', 'stem.bias', 'block1_fc1.weight', 'block1_fc1.bias']"
    first, last = losses(lines[1])
    assert last < 0.5 * first  # 60 Adam steps on a separable task: the loss falls by half at least
    first, last = losses(lines[2])
    assert last < first
    assert lines[3] == "['encoder.0.weight', 'encoder.0.bias', 'encoder.2.weight', 'encoder.2.bias', 'same.weight', 'same.bias']"
    assert lines[4] == "siamese: every gradient matches float64 finite differences"


def test_the_fine_tuning_example_moves_each_part_as_asked():
    (line,) = run("fine_tuning.py")
    body1, body2, head = (float(v) for v in re.fullmatch(
        r"body1 moved ([0-9.e+-]+), body2 ([0-9.e+-]+), new head ([0-9.e+-]+)", line).groups())
    assert body1 == 0.0
    # Adam moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) = 3.17 lr a step (Kingma and Ba, sec. 2.1)
    assert 0 < body2 <= 30 * 1e-3 * (1 - 0.9) / (1 - 0.999) ** 0.5
    assert body2 < head


@pytest.mark.parametrize("name", ["graph_models.py", "fine_tuning.py"])
def test_the_examples_are_linked_from_the_page(name):
    assert f"docs/examples/{name}" in (ROOT / "docs" / "layers.md").read_text(encoding="utf-8")
