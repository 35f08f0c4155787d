"""The docs name every public name and every command-line option, and nothing that does not exist
(issue 28, item 5: docs that match).

Python: each name in the `__all__` of gpunet and of gpunet.layers, optim, losses, callbacks, export,
models, data and init must appear in docs/*.md or README.md qualified as a user writes it,
`gn.optim.AdamW` (or `gpunet.optim.AdamW`); a class or a function as a call, `gn.optim.AdamW(`, which
is where its signature goes (exception classes excepted: they are raised, not called). The reference
is docs/api.md; docs/training.md (the training loop's hooks and built-in callbacks) counts as well.
Every parameter of gn.fit has a row `| `name` | ... |` in docs/api.md's "## Training" section.

Command line: documented in docs/api.md's "## Command line" section (decided here; README.md's
"Command line" section keeps the tour's synopsis and is not checked): one `### gpunet COMMAND`
subsection per command of gpunet.cli.build_parser(), naming every option string of that command
(--help excepted; --no-cuda-graph counts as an option of its own); the options of `gpunet` itself
anywhere in the section.

The other way round, so the reference never lists what was renamed or removed: every `gn.`/`gpunet.`
name written in docs/api.md exists, and every option written in a command's subsection is one of
that command's options.

docs/architecture.md's map names every module and package directly under src/gpunet/ and no .py file
that does not exist, and its cli.py line lists every command.

Each failure message says exactly what to add (or remove) and where.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import types
from pathlib import Path

import gpunet as gn
from gpunet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SRC = ROOT / "src" / "gpunet"
# the modules whose __all__ is the public API, under the prefix users write
MODULES = {"gn": "gpunet", "gn.layers": "gpunet.layers", "gn.optim": "gpunet.optim", "gn.losses": "gpunet.losses",
           "gn.callbacks": "gpunet.training.callbacks", "gn.export": "gpunet.export", "gn.models": "gpunet.models",
           "gn.data": "gpunet.data", "gn.init": "gpunet.init"}
OPTION = re.compile(r"(?<![\w-])--[a-z0-9][\w-]*")


def docs_text() -> str:
    """README.md and every docs/*.md, where a public name may be documented."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def section(text: str, heading: str) -> str | None:
    """The body under the line `heading` (e.g. "## Command line") up to the next heading of the same
    or a higher level (a `# comment` inside a fenced code block is no heading); None when there is
    no such heading."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    if heading not in lines:
        return None
    body, fenced = [], False
    for line in lines[lines.index(heading) + 1:]:
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes:hashes + 1] == " ":
            break
        body.append(line)
    return "\n".join(body)


# ---------------------------------------------------------------- Python names
def is_called(obj) -> bool:
    """Whether the docs must show obj as a call (its signature): classes and functions, not modules,
    tables or exceptions."""
    if isinstance(obj, types.ModuleType) or not callable(obj):
        return False
    return not (isinstance(obj, type) and issubclass(obj, BaseException))


def public_names() -> list[tuple[str, bool, str]]:
    """(qualified name as users write it, whether it must appear as a call, where it is declared)."""
    names = []
    for prefix, module_name in MODULES.items():
        module = importlib.import_module(module_name)
        declared = getattr(module, "__all__", None)
        assert declared is not None, f"{module_name} has no __all__: add one listing its public API"
        for name in declared:
            names.append((f"{prefix}.{name}", is_called(getattr(module, name)), f"{module_name}.__all__"))
    return names


def mentioned(qualified: str, call: bool, text: str) -> bool:
    tail = re.escape(qualified.removeprefix("gn."))
    return re.search(r"(?<![\w.])(?:gn|gpunet)\." + tail + (r"\(" if call else r"(?!\w)"), text) is not None


def undocumented_names(text: str) -> list[str]:
    return [f"{qualified}{'(' if call else ''}   (in {where})" for qualified, call, where in public_names()
            if not mentioned(qualified, call, text)]


def resolves(dotted: str) -> bool:
    """Whether gpunet.<dotted> exists: an attribute, or a submodule not imported by gpunet itself."""
    obj, path = gn, "gpunet"
    for part in dotted.split("."):
        path += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if not isinstance(obj, types.ModuleType):
            return False
        try:
            obj = importlib.import_module(path)
        except ImportError:
            return False
    return True


def stale_names(text: str) -> list[str]:
    written = re.findall(r"(?<![\w.])(?:gn|gpunet)((?:\.\w+)+)", text)
    return sorted({f"gn{dotted}" for dotted in written if not resolves(dotted[1:])})


def fit_rows_missing(function, text: str) -> list[str]:
    training = section(text, "## Training") or ""
    rows = set(re.findall(r"^\| `(\w+)` \|", training, flags=re.MULTILINE))
    return [name for name in inspect.signature(function).parameters if name not in rows]


# ---------------------------------------------------------------- command line
def commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Command -> its option strings (--help excepted); "" for the options of `gpunet` itself."""
    found = {"": [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = [s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")]
    return found


def undocumented_options(parser: argparse.ArgumentParser, api_text: str) -> list[str]:
    where = "docs/api.md's \"## Command line\" section"
    cli = section(api_text, "## Command line")
    if cli is None:
        return [f"docs/api.md has no \"## Command line\" section: add it, with a \"### gpunet COMMAND\" subsection "
                "per command"]
    problems = []
    for command, options in commands(parser).items():
        if not command:
            problems += [f"{option} (an option of gpunet itself): name it in {where}" for option in options
                         if option not in OPTION.findall(cli)]
            continue
        body = section(cli, f"### gpunet {command}")
        if body is None:
            problems.append(f"gpunet {command}: add a \"### gpunet {command}\" subsection to {where}, naming its "
                            f"options {' '.join(options)}")
            continue
        problems += [f"{option}: name it under \"### gpunet {command}\" in {where}" for option in options
                     if option not in OPTION.findall(body)]
    return problems


def stale_options(parser: argparse.ArgumentParser, api_text: str) -> list[str]:
    cli = section(api_text, "## Command line") or ""
    problems = []
    for command, options in commands(parser).items():
        body = section(cli, f"### gpunet {command}") if command else None
        problems += [f"{option} under \"### gpunet {command}\" is no option of gpunet {command}"
                     for option in sorted(set(OPTION.findall(body or ""))) if option not in options]
    return problems


# ---------------------------------------------------------------- the architecture's map
def unmapped_modules(text: str, src: Path = SRC) -> list[str]:
    """The modules (x.py) and packages (x/) directly under src that the map does not name, written
    bare (`x.py`, `x/`) or as src/gpunet/x.py."""
    entries = sorted(p.name for p in src.glob("*.py") if p.name != "__init__.py")
    entries += sorted(f"{p.name}/" for p in src.iterdir() if (p / "__init__.py").is_file())
    return [entry for entry in entries
            if not re.search(r"(?:(?<![\w/.])|src/gpunet/)" + re.escape(entry) + r"(?![\w])", text)]


def missing_files(text: str) -> list[str]:
    """The .py paths the map names that do not exist: relative to the repository or to src/gpunet/, or,
    written bare, anywhere in the package (`flat.py` for layers/flat.py)."""
    missing = []
    for path in sorted(set(re.findall(r"(?<![\w/.*])([\w/]*\w\.py)(?!\w)", text))):
        if "/" in path:
            found = (ROOT / path).is_file() or (SRC / path).is_file()
        else:
            found = any(SRC.rglob(path))
        if not found:
            missing.append(path)
    return missing


def mapped_commands(text: str) -> list[str] | None:
    """The commands of the map's `gpunet a|b|c` line, or None when it has none."""
    found = re.search(r"`gpunet ((?:[a-z]+\|)+[a-z]+)`", text)
    return found.group(1).split("|") if found else None


# ---------------------------------------------------------------- the docs as they are
def test_every_public_name_is_documented():
    missing = undocumented_names(docs_text())
    assert not missing, (
        "public names missing from the docs: document each in docs/api.md (the training hooks and callbacks may go "
        "in docs/training.md), a class or function written as a call with its signature, e.g. "
        "`gn.optim.AdamW(model, lr=1e-3, ...)  # what it does; what it raises`:\n  " + "\n  ".join(missing))


def test_every_parameter_of_fit_has_a_row():
    missing = fit_rows_missing(gn.fit, API.read_text(encoding="utf-8"))
    assert not missing, ("gn.fit parameters without a row in the table of docs/api.md's \"## Training\" section; add "
                         "`| `NAME` | what it does |` for each: " + ", ".join(missing))


def test_every_command_and_option_is_documented():
    missing = undocumented_options(build_parser(), API.read_text(encoding="utf-8"))
    assert not missing, "the command line's reference is incomplete:\n  " + "\n  ".join(missing)


def test_the_reference_names_nothing_that_does_not_exist():
    text = API.read_text(encoding="utf-8")
    stale = stale_names(text) + stale_options(build_parser(), text)
    assert not stale, "docs/api.md names what does not exist (renamed or removed?):\n  " + "\n  ".join(stale)


def test_the_architecture_maps_every_module_and_command():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    unmapped = unmapped_modules(text)
    assert not unmapped, ("docs/architecture.md's map (\"## Layers of the code\") does not name these modules of "
                          "src/gpunet/; add each where it sits among the layers, with what it holds: "
                          + ", ".join(unmapped))
    missing = missing_files(text)
    assert not missing, "docs/architecture.md names files that do not exist (moved or renamed?): " + ", ".join(missing)
    listed, actual = mapped_commands(text), sorted(c for c in commands(build_parser()) if c)
    assert listed is not None and sorted(listed) == actual, (
        f"docs/architecture.md's cli.py line lists the commands {listed}; write `gpunet {'|'.join(actual)}`")


def test_the_checks_see_the_public_api():
    """The lists the tests above walk hold what they must: a check over an empty list cannot fail."""
    names = {qualified: call for qualified, call, _ in public_names()}
    assert names["gn.fit"] is True and names["gn.optim.AdamW"] is True and names["gn.callbacks.EarlyStopping"] is True
    assert names["gn.layers"] is False and names["gn.data.DATASETS"] is False
    assert names["gn.TrainingDiverged"] is False  # an exception: raised, so named, not called
    assert len(names) >= 100
    cli = commands(build_parser())
    assert set(cli) == {"", "train", "search", "eval", "predict", "generate", "bench", "parity", "info"}
    assert "--no-cuda-graph" in cli["train"] and "--lockstep" in cli["parity"] and cli["info"] == ["--debug"]


# ---------------------------------------------------------------- the checks can fail
def test_a_planted_undocumented_name_is_reported(monkeypatch):
    def lion(model, lr=1e-4):
        """A planted optimizer no page documents."""

    monkeypatch.setattr(gn.optim, "Lion", lion, raising=False)
    monkeypatch.setattr(gn.optim, "__all__", [*gn.optim.__all__, "Lion"])
    monkeypatch.setattr(gn.losses, "HUBER_DELTA", 1.0, raising=False)
    monkeypatch.setattr(gn.losses, "__all__", [*gn.losses.__all__, "HUBER_DELTA"])
    text = docs_text()
    assert undocumented_names(text) == ["gn.optim.Lion(   (in gpunet.optim.__all__)",
                                        "gn.losses.HUBER_DELTA   (in gpunet.losses.__all__)"]
    # named in passing is not enough for a function: its call (the signature) must be there
    assert undocumented_names(text + "\nSee gn.optim.Lion and gn.losses.HUBER_DELTA.\n") == [
        "gn.optim.Lion(   (in gpunet.optim.__all__)"]
    assert undocumented_names(text + "\ngn.optim.Lion(model, lr=1e-4)\ngpunet.losses.HUBER_DELTA\n") == []
    # a longer name does not stand for a shorter one
    assert undocumented_names(text + "\ngn.optim.Lionel(model)\ngn.losses.HUBER_DELTAS\n") == [
        "gn.optim.Lion(   (in gpunet.optim.__all__)", "gn.losses.HUBER_DELTA   (in gpunet.losses.__all__)"]


def test_a_module_without_all_is_reported(monkeypatch):
    monkeypatch.delattr(gn.init, "__all__")
    try:
        public_names()
    except AssertionError as exc:
        assert str(exc).startswith("gpunet.init has no __all__: add one listing its public API")
    else:
        raise AssertionError("a module without __all__ went unnoticed")


def test_a_planted_undocumented_option_and_command_are_reported():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparsers.choices["train"].add_argument("--warmup-steps")
    subparsers.choices["eval"].add_argument("--top")  # documented under predict, not under eval
    subparsers.add_parser("export").add_argument("--onnx")
    parser.add_argument("--quiet")
    api = API.read_text(encoding="utf-8")
    assert undocumented_options(parser, api) == [
        "--quiet (an option of gpunet itself): name it in docs/api.md's \"## Command line\" section",
        "--warmup-steps: name it under \"### gpunet train\" in docs/api.md's \"## Command line\" section",
        "--top: name it under \"### gpunet eval\" in docs/api.md's \"## Command line\" section",
        "gpunet export: add a \"### gpunet export\" subsection to docs/api.md's \"## Command line\" section, naming "
        "its options --onnx"]
    assert undocumented_options(parser, "# The public API\n") == [
        "docs/api.md has no \"## Command line\" section: add it, with a \"### gpunet COMMAND\" subsection per command"]


def test_planted_stale_names_and_options_are_reported():
    api = API.read_text(encoding="utf-8")
    planted = api.replace("### gpunet eval\n", "### gpunet eval\n\n`--limit N`: at most N images.\n", 1)
    planted += "\ngn.optim.Lion(model) ; gpunet.layers.Dense2(1, 2) ; gn.layers.Dense(1, 2)\n"
    assert stale_names(planted) == ["gn.layers.Dense2", "gn.optim.Lion"]
    assert stale_options(build_parser(), planted) == ["--limit under \"### gpunet eval\" is no option of gpunet eval"]


def test_a_fit_parameter_without_a_row_is_reported():
    def fit(model, train, val=None, *, optimizer, accumulate=1):
        """fit with a parameter the table lacks."""

    table = "## Training\n\n| parameter | what |\n|---|---|\n" + "".join(
        f"| `{name}` | ... |\n" for name in ("model", "train", "val", "optimizer"))
    assert fit_rows_missing(fit, table) == ["accumulate"]
    assert fit_rows_missing(fit, table + "| `accumulate` | batches per optimizer step |\n") == []
    assert fit_rows_missing(fit, table.replace("## Training", "## Elsewhere")) == [
        "model", "train", "val", "optimizer", "accumulate"]


def test_an_unmapped_module_and_a_missing_file_are_reported(tmp_path):
    (tmp_path / "planted.py").write_text("")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "notes").mkdir()  # not a package: no __init__.py
    assert unmapped_modules("", tmp_path) == ["planted.py", "training/"]
    assert unmapped_modules("src/gpunet/planted.py, `training/`", tmp_path) == []
    assert unmapped_modules("layers/planted.py, my_training/", tmp_path) == ["planted.py", "training/"]
    assert missing_files("`loop.py`, src/gpunet/layers/flat.py, flat.py, tests/test_imports.py, kernels/*.cu") == []
    assert missing_files("`planted.py` and layers/loop.py") == ["layers/loop.py", "planted.py"]
    assert mapped_commands("src/gpunet/cli.py       `gpunet train|eval|info`") == ["train", "eval", "info"]
    assert mapped_commands("no command line here") is None


def test_a_section_ends_at_the_next_heading_outside_code():
    text = "## A\none\n```python\n# a comment, not a heading\n```\n### A.1\ntwo\n## B\nthree\n"
    assert section(text, "## A") == "one\n```python\n# a comment, not a heading\n```\n### A.1\ntwo"
    assert section(text, "### A.1") == "two"
    assert section(text, "## C") is None
