"""gpunet in a notebook: importing and training leave the process's warning filters and
matplotlib's backend as they were; History plots inline when asked; matplotlib is optional."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy

import gpunet as gn

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_and_training_leave_warning_filters_and_matplotlib_backend_alone(tmp_path):
    out = _python(f"""
        import json, sys, warnings
        import matplotlib
        matplotlib.use("svg")  # what a notebook might have chosen
        filters = list(warnings.filters)
        import gpunet as gn, gpunet.cli, gpunet.benchmarks.report
        imported = list(warnings.filters) == filters
        x, y = gn.data.load_mnist_sample()
        x = x.reshape(len(x), -1).astype('float32') / 255
        model = gn.models.mlp((784, 16, 10))
        gn.fit(model, (x[:256], y[:256]), (x[256:320], y[256:320]), optimizer=gn.optim.SGD(model, 0.1),
               steps=4, out_dir={str(tmp_path / "run")!r}, progress=False, log=lambda *a: None)
        print(json.dumps({{"filters_after_import": imported, "filters_after_fit": list(warnings.filters) == filters,
                          "backend": dict.__getitem__(matplotlib.rcParams, "backend"),
                          "pyplot": "matplotlib.pyplot" in sys.modules}}))
    """)
    assert json.loads(out.splitlines()[-1]) == {"filters_after_import": True, "filters_after_fit": True,
                                                 "backend": "svg", "pyplot": False}
    assert (tmp_path / "run" / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_import_does_not_import_matplotlib():
    out = _python("import sys, gpunet, gpunet.cli; print('matplotlib' in sys.modules)")
    assert out.strip() == "False"


def test_source_switches_no_backend_and_sets_no_warning_filter():
    pattern = re.compile(r"matplotlib\.use\(|switch_backend|import matplotlib\.pyplot|filterwarnings\(|simplefilter\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_without_matplotlib_history_png_is_skipped_with_one_line(tmp_path):
    out = _python(f"""
        import sys
        sys.modules["matplotlib"] = None  # as if the plot extra were not installed
        import gpunet as gn
        x, y = gn.data.load_mnist_sample()
        x = x.reshape(len(x), -1).astype('float32') / 255
        model = gn.models.mlp((784, 16, 10))
        history = gn.fit(model, (x[:256], y[:256]), optimizer=gn.optim.SGD(model, 0.1), steps=3,
                         out_dir={str(tmp_path / "run")!r}, progress=False, log=lambda *a: None)
        print("written:", sorted(set(p.name for p in history.written)))
    """)
    assert out.splitlines()[-2] == "history.png skipped: matplotlib is not installed (pip install 'gpunet[plot]')"
    assert out.splitlines()[-1] == "written: ['history.json', 'last.safetensors', 'metrics.csv', 'model.safetensors']"
    assert not (tmp_path / "run" / "history.png").exists()
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) >= 1


def test_history_plots_inline_when_asked(monkeypatch, tmp_path):
    shown = []
    display_module = type(sys)("IPython.display")

    class Image:
        def __init__(self, data, format):
            self.data, self.format = data, format

    display_module.Image, display_module.display = Image, shown.append
    ipython = type(sys)("IPython")
    ipython.version_info = (9, 0)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    history = gn.History([{"step": s, "epoch": 1, "train_loss": 1.0 / s, "val_loss": 1.2 / s} for s in (1, 2, 3)])
    figure = history.plot(inline=True)
    assert len(shown) == 1 and shown[0].format == "png" and shown[0].data[:4] == b"\x89PNG"
    (line_train, line_val) = figure.axes[0].lines
    assert numpy.allclose(line_val.get_ydata(), [1.2, 0.6, 0.4]) and list(line_train.get_xdata()) == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []  # inline alone writes no file
