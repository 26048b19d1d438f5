"""The code in README.md and docs/*.md runs as written.

Python: every fenced ``python`` block is executed. The blocks of one file run in order in one
namespace, so a later block may use the names an earlier one defined; selecting one block
(``-k``) runs the blocks before it first. Conventions, on a block's first lines:

* ``# needs: METAJAX_DATA_DIR`` (any upper-case name: an environment variable; a lower-case
  name: an importable module; several separated by commas) skips the block, with the
  reason, when that is missing. Later blocks must not depend on names a skipped block
  defines.

Shell: every line of a fenced ``bash`` block (continuations ``\\`` joined, ``&&`` chains
split, comments dropped) is checked by what it starts with:

* ``metajax train`` / ``metajax continual``: run with ``--dry-run`` appended (exit 0, last
  line JSON); ``metajax evaluate`` / ``metajax plot`` (they need a finished run) are
  checked against the subcommand's ``--help``: it runs and lists every flag the line uses;
* ``metajax presets ...``: run as it is;
* ``python benchmarks/X.py ...``: the script exists and its ``--help`` lists every flag
  used; ``benchmarks/fewshot.py`` lines also run with ``--table-only`` (arms and settings
  validated, nothing trained); ``python -m pytest PATHS``: the paths exist;
* ``pip install ...``: every extra named (``.[dev]``, ``metajax[tensorboard]``) exists;
* ``bash FILE``: the file exists; ``srun`` / ``gcloud``: the ``metajax`` command they
  launch is checked as above;
* a few set-up commands (``python3 -m venv``, ``.``, ``source``, ``cd``, ``export``,
  ``tensorboard``, ``sha256sum``) are not run; anything else fails, so a new kind of
  command needs a rule here.

A fenced ``toml`` block whose first line is ``# file: NAME`` is written to ``NAME`` in the
working folder of the commands, so a ``--config NAME`` line can use it.

The ``metajax`` lines run through the venv's ``metajax`` entry point (the function its
console script calls), all of them in one subprocess so that Python and JAX start once, in
a temporary folder; one more test runs the console script itself. ``~`` is a temporary home,
and both ``~/data`` and ``$METAJAX_DATA_DIR`` name a temporary data folder holding links to
the dataset folders of the real ``$METAJAX_DATA_DIR`` when that is set, and an empty folder
for every other data set a preset reads (a dry run checks that the folder of a data set
metajax does not download exists, not what it holds). 8 host devices are simulated so that
``--devices 8`` validates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
METAJAX = Path(sys.executable).parent / "metajax"
DATASET_FOLDERS = ("mnist", "omniglot", "miniimagenet", "cifar100")
NOT_RUN = {"python3", ".", "source", "cd", "export", "tensorboard", "sha256sum"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")
_FLAG = re.compile(r"^--[a-z][a-z0-9-]*")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, in order."""
    out, lang, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if lang is None and match:
            lang, start, lines = match.group(1), number, []
        elif lang is not None and line.strip() == "```":
            out.append(Block(path, start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path}: a fence opened on line {start} is never closed"
    return out


def needs(block: Block) -> list[str]:
    """What a block declares it needs (``# needs: ...`` among its leading comment lines)."""
    out = []
    for line in block.code.splitlines():
        if not line.startswith("#"):
            break
        match = _NEEDS.match(line)
        if match:
            out += [n.strip() for n in match.group(1).split(",") if n.strip()]
    return out


def missing(block: Block) -> list[str]:
    """The needs of ``block`` this environment does not meet."""
    import importlib.util

    out = []
    for name in needs(block):
        if name.isupper():
            if not os.environ.get(name):
                out.append(f"${name} unset")
        elif importlib.util.find_spec(name) is None:
            out.append(f"module {name} not installed")
    return out


def shell_lines(block: Block) -> list[str]:
    """The commands of a bash block: continuations joined, ``&&`` chains split."""
    joined, current = [], ""
    for line in block.code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    commands = []
    for line in joined:
        for part in line.split("&&"):
            tokens = shlex.split(part, comments=True)
            if tokens:
                commands.append(shlex.join(tokens))
    return commands


PY_BLOCKS = {path: [b for b in blocks(path) if b.lang == "python"] for path in DOC_FILES}
SHELL = [(b, line) for path in DOC_FILES for b in blocks(path) if b.lang == "bash"
         for line in shell_lines(b)]


def _id(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.:=-]+", "-", value)[:80]


# --- python blocks ----------------------------------------------------------------------------


class _FileRun:
    """The shared namespace of one file's python blocks, run in order."""

    def __init__(self, path: Path, cwd: Path):
        self.blocks = PY_BLOCKS[path]
        self.cwd = cwd
        self.namespace: dict = {"__name__": "__docs__"}
        self.done = 0
        self.failed: str | None = None

    def run_through(self, index: int) -> None:
        while self.done <= index:
            block = self.blocks[self.done]
            self.done += 1
            if self.failed:
                pytest.fail(f"{block.where}: not run, an earlier block failed ({self.failed})")
            if missing(block):
                if self.done - 1 == index:
                    pytest.skip(f"{block.where} needs {', '.join(missing(block))}")
                continue
            old = Path.cwd()
            os.chdir(self.cwd)
            try:
                # Padded so that tracebacks give the line numbers of the markdown file.
                code = "\n" * block.line + block.code
                exec(compile(code, str(block.path.relative_to(REPO)), "exec"), self.namespace)
            except BaseException:
                self.failed = block.where
                raise
            finally:
                os.chdir(old)


_RUNS: dict[Path, _FileRun] = {}


@pytest.mark.parametrize(
    "path, index",
    [(p, i) for p, bs in PY_BLOCKS.items() for i in range(len(bs))],
    ids=[PY_BLOCKS[p][i].where for p, bs in PY_BLOCKS.items() for i in range(len(bs))],
)
def test_python_block_runs(path, index, tmp_path_factory):
    if path not in _RUNS:
        _RUNS[path] = _FileRun(path, tmp_path_factory.mktemp("py-" + path.stem))
    _RUNS[path].run_through(index)


# --- shell lines ------------------------------------------------------------------------------

# Runs the venv's `metajax` entry point (the function its console script calls) once per
# argument list, in one process, so that the interpreter and JAX start once for all the
# lines of the docs instead of once per line; writes one JSON result per call.
_DRIVER = """
import contextlib, io, json, sys, traceback
from importlib.metadata import entry_points

main = entry_points(group="console_scripts")["metajax"].load()
calls = json.load(open(sys.argv[1]))
results = []
for argv in calls:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def _strip_env(tokens: list[str]) -> list[str]:
    """``tokens`` without leading ``VAR=value`` assignments."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # the commands read METAJAX_DATA_DIR from the environment anyway
    return tokens


def _launched(tokens: list[str], what: str) -> list[str]:
    """The ``metajax`` command an ``srun`` or ``gcloud`` line starts."""
    if tokens[0] == "gcloud":
        for token in tokens:
            if token.startswith("--command="):
                return shlex.split(token.removeprefix("--command="))
        pytest.fail(f"{what}: gcloud without --command=")
    assert "metajax" in tokens, f"{what}: launches no metajax command"
    return tokens[tokens.index("metajax"):]


def _metajax_tokens(line: str) -> list[str] | None:
    """The ``metajax`` command of a docs line (also one that ``srun`` / ``gcloud`` start)."""
    tokens = _strip_env(shlex.split(line))
    if tokens and tokens[0] == "metajax":
        return tokens
    if tokens and tokens[0] in ("srun", "gcloud"):
        return _launched(tokens, line)
    return None


def _metajax_argv(tokens: list[str], home: Path, data: Path) -> list[str]:
    """What the check of a ``metajax`` line runs: presets as written, train and continual
    with ``--dry-run``, the other subcommands' ``--help``."""
    assert len(tokens) >= 2, f"`metajax` without a subcommand: {tokens}"
    argv = [_expand(t, home, data) for t in tokens[1:]]
    if argv[0] == "presets":
        return argv
    if argv[0] in ("train", "continual"):
        return [*argv, "--dry-run"]
    return [argv[0], "--help"]


def _expand(token: str, home: Path, data: Path) -> str:
    if token.startswith("~"):
        token = str(home) + token[1:]
    token = token.replace("$METAJAX_DATA_DIR", str(data)).replace("$I", "0")
    return os.path.expandvars(token)


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """The working folder, the ``~`` of the docs, the environment of the commands and the
    results of every ``metajax`` call the docs' lines need, run in one batch."""
    cwd = tmp_path_factory.mktemp("docs-cwd")
    home = tmp_path_factory.mktemp("docs-home")
    data = home / "data"
    data.mkdir()
    real = os.environ.get("METAJAX_DATA_DIR")
    for name in DATASET_FOLDERS:
        if real and (Path(real) / name).is_dir():
            (data / name).symlink_to((Path(real) / name).resolve(), target_is_directory=True)
        else:
            (data / name).mkdir()
    for path in DOC_FILES:
        for block in blocks(path):
            first = block.code.splitlines()[0] if block.code.strip() else ""
            match = re.match(r"#\s*file:\s*(\S+)", first)
            if block.lang == "toml" and match:
                (cwd / match.group(1)).write_text(block.code)
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["METAJAX_DATA_DIR"] = str(data)
    env.pop("PYTHONPATH", None)
    calls = []
    for _, line in SHELL:
        tokens = _metajax_tokens(line)
        if tokens is not None and len(tokens) >= 2:
            argv = _metajax_argv(tokens, home, data)
            if argv not in calls:
                calls.append(argv)
    (cwd / "calls.json").write_text(json.dumps(calls))
    done = subprocess.run([sys.executable, "-c", _DRIVER, "calls.json", "results.json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the docs' metajax calls did not run:\n{done.stderr[-3000:]}"
    results = json.loads((cwd / "results.json").read_text())
    return {"cwd": cwd, "home": home, "data": data, "env": env, "help": {},
            "metajax": {tuple(a): r for a, r in zip(calls, results, strict=True)}}


def _run(cmd: list[str], shell, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=shell["cwd"], env=shell["env"], capture_output=True,
                          text=True, timeout=timeout)


def _ok(rc: int, stdout: str, stderr: str, what: str) -> None:
    assert rc == 0, f"{what} exited {rc}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-2000:]}"


def _flags_listed(help_text: str, tokens: list[str], what: str, prog: str) -> None:
    for token in tokens:
        flag = _FLAG.match(token)
        if flag and flag.group(0) not in help_text:
            pytest.fail(f"{what}: {flag.group(0)} is not an option of {prog}")


def _check_metajax(tokens: list[str], shell, what: str) -> None:
    argv = _metajax_argv(tokens, shell["home"], shell["data"])
    result = shell["metajax"][tuple(argv)]
    shown = f"{what}: metajax {' '.join(argv)}"
    _ok(result["rc"], result["stdout"], result["stderr"], shown)
    stdout = result["stdout"].strip()
    if argv[0] == "presets":
        assert stdout, f"{shown}: printed nothing"
    elif argv[-1] == "--dry-run":
        last = stdout.splitlines()[-1] if stdout else ""
        try:
            assert isinstance(json.loads(last), dict)
        except (ValueError, AssertionError):
            pytest.fail(f"{shown}: the last line is not a JSON object: {last!r}")
    else:
        _flags_listed(result["stdout"], tokens[2:], what, f"metajax {argv[0]}")


def _check_python(tokens: list[str], shell, what: str) -> None:
    args = tokens[1:]
    if args[:2] == ["-m", "pytest"]:
        for arg in args[2:]:
            if not arg.startswith("-"):
                assert (REPO / arg.split("::")[0]).exists(), f"{what}: {arg} does not exist"
        return
    if args[:2] == ["-m", "pip"]:
        _check_pip(["pip", *args[2:]], what)
        return
    assert args and args[0].endswith(".py"), f"{what}: no rule for this python command"
    script = REPO / args[0]
    assert script.is_file(), f"{what}: {args[0]} does not exist"
    if args[0] not in shell["help"]:
        result = _run([sys.executable, str(script), "--help"], shell)
        _ok(result.returncode, result.stdout, result.stderr, f"{args[0]} --help")
        shell["help"][args[0]] = result.stdout
    _flags_listed(shell["help"][args[0]], args[1:], what, args[0])
    if args[0] == "benchmarks/fewshot.py":
        jsonl = shell["cwd"] / "fewshot-docs.jsonl"
        expanded = [_expand(a, shell["home"], shell["data"]) for a in args[1:]]
        result = _run([sys.executable, str(script), *expanded, "--table-only", "--jsonl",
                       str(jsonl)], shell)
        _ok(result.returncode, result.stdout, result.stderr, f"{what} --table-only")


def _check_pip(tokens: list[str], what: str) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for token in tokens[1:]:
        match = re.fullmatch(r"(?:\.|metajax)\[([a-z0-9,_-]+)\]", token)
        if match:
            for extra in match.group(1).split(","):
                assert extra in extras, f"{what}: pyproject.toml has no extra {extra!r}"


@pytest.mark.parametrize("block, line", SHELL,
                         ids=[f"{b.where}:{_id(line)}" for b, line in SHELL])
def test_shell_line(block, line, shell):
    what = f"{block.where}: {line}"
    tokens = _strip_env(shlex.split(line))
    assert tokens, f"{what}: nothing to run"
    head = tokens[0]
    if _metajax_tokens(line) is not None:
        _check_metajax(_metajax_tokens(line), shell, what)
    elif head in ("python", "python3") and tokens[1:3] != ["-m", "venv"]:
        _check_python(tokens, shell, what)
    elif head == "pip":
        _check_pip(tokens, what)
    elif head == "bash":
        assert (REPO / tokens[1]).is_file(), f"{what}: {tokens[1]} does not exist"
    elif head not in NOT_RUN:
        pytest.fail(f"{what}: no rule for {head!r} commands in tests/test_docs.py")


def test_the_console_script_itself_runs(shell):
    # The lines above call the entry point the script calls; this runs the script.
    assert METAJAX.is_file(), f"no metajax script beside {sys.executable}"
    result = _run([str(METAJAX), "presets"], shell)
    _ok(result.returncode, result.stdout, result.stderr, "metajax presets")
    assert "sinusoid-maml" in result.stdout


# --- the harness itself -----------------------------------------------------------------------


def test_docs_exist_and_hold_code():
    names = {p.name for p in DOC_FILES}
    for page in ("maml.md", "reptile.md", "metasgd.md", "anil.md", "imaml.md", "mamlpp.md",
                 "er.md", "gem.md", "mer.md", "lamaml.md", "data.md", "resuming.md",
                 "scaling.md"):
        assert page in names, f"docs/{page} is missing"
    assert sum(len(b) for b in PY_BLOCKS.values()) >= 14
    assert len(SHELL) >= 10


def test_parsers_split_what_the_conventions_say(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\n# needs: METAJAX_NOT_SET_ANYWHERE, nosuchmodule_xyz\nx = 1\n```\n"
        "```bash\nmetajax train a \\\n    --steps 2  # comment\n# only a comment\n"
        "pip install -e \".[dev]\" && metajax presets\n```\n")
    py, sh = blocks(page)
    assert (py.lang, py.line, sh.lang) == ("python", 2, "bash")
    assert missing(py) == ["$METAJAX_NOT_SET_ANYWHERE unset", "module nosuchmodule_xyz not "
                           "installed"]
    assert shell_lines(sh) == ["metajax train a --steps 2", "pip install -e '.[dev]'",
                               "metajax presets"]
    with pytest.raises(AssertionError, match="no extra 'nope'"):
        _check_pip(["pip", "install", "metajax[nope]"], "x")


def test_lines_map_to_the_calls_the_conventions_say(tmp_path):
    home, data = tmp_path / "home", tmp_path / "data"
    train = _metajax_tokens("METAJAX_DATA_DIR=~/data metajax train x --data-dir ~/data")
    assert _metajax_argv(train, home, data) == ["train", "x", "--data-dir", f"{home}/data",
                                                "--dry-run"]
    launched = _metajax_tokens("srun --nodes 2 metajax continual y --distributed")
    assert _metajax_argv(launched, home, data) == ["continual", "y", "--distributed",
                                                   "--dry-run"]
    gcloud = _metajax_tokens('gcloud a ssh b --command="metajax train z --out /o"')
    assert gcloud == ["metajax", "train", "z", "--out", "/o"]
    assert _metajax_argv(["metajax", "evaluate", "run", "--tasks", "5"], home, data) == [
        "evaluate", "--help"]
    assert _metajax_argv(["metajax", "presets", "p"], home, data) == ["presets", "p"]
    assert _metajax_tokens("python benchmarks/x.py") is None
    _flags_listed("usage: --tasks N", ["run", "--tasks", "5"], "line", "metajax evaluate")
    with pytest.raises(pytest.fail.Exception, match="--bogus is not an option"):
        _flags_listed("usage: --tasks N", ["--bogus"], "line", "metajax evaluate")
