"""Every command the README and docs/ give still runs: a moved module, a renamed option or a
lost Makefile target fails here, not in a reader's terminal.

Commands come from fenced ``bash``/``sh`` blocks (backslash continuations joined, comments
skipped, heredocs kept with their command), from lines of unlabelled blocks that start like
a command, and from inline code in prose that starts like one (``flashvlm ...``, ``make ...``,
``python -m ...``). Each is checked the cheapest way that still catches breakage, by the
first rule in ``RULES`` that claims it:

- ``flashvlm SUB ...`` and ``python -m MODULE`` / ``python SCRIPT.py`` with first-party code:
  the arguments go through the real argparse parser and stop there, so nothing runs. A
  synopsis (``[--opt X]``, ``{a,b}``, ``...``), or a prose fragment that leaves out required
  arguments, is checked option by option against the parser instead. For a module or
  script, every first-party import in it and in what it reaches (imports inside functions
  too) must resolve, names included.
- ``make TARGET``: ``make -n TARGET``; ``bash SCRIPT``: the file, and ``bash -n``.
- A heredoc Python snippet runs.
- External tools (``vllm serve``, ``python -m lmms_eval``, ``pip install``, ``curl`` to a vLLM
  server): only our part in them (the entry point, ``--model_args`` keys, ``--hf-overrides``
  settings, a request's ``mm_processor_kwargs`` settings, extras, pins).
- Shell lines (assignments, ``export``, loops): their block passes ``bash -n``.

A command that no rule claims and that ``UNCHECKED`` does not name fails
``test_every_documented_command_has_a_check``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Where a first-party top-level package lives in this checkout (the workbench is not installed).
FIRST_PARTY = {"flashvlm": REPO / "src" / "flashvlm", "lab": REPO / "lab"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-vllm/bin/python"}
#: How inline code in prose starts when it is a command.
INLINE_COMMAND = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S+ )*"
    r"(?:flashvlm |make |python3? |\.venv(?:-vllm)?/bin/|bash |pip install |vllm serve )"
)
#: Engines installed only in their own environments; a module that needs one at import time
#: has its parse check run there (tests/vllm_plugin/) rather than here.
OPTIONAL_ENGINES = {"vllm", "lmms_eval"}

#: Commands deliberately not checked, by a pattern over the command text, with the reason.
UNCHECKED = {
    r"^python -m vllm\.entrypoints\.openai\.api_server ARGS$": (
        "vLLM's own server module, with vllm serve's arguments; our part (--hf-overrides) is checked on "
        "the vllm serve lines"
    ),
}


@dataclass
class Command:
    document: Path
    line: int
    text: str  # continuations joined, comments dropped
    prose: bool  # inline code in a sentence, not a block
    block: str = ""  # the whole fenced block it came from (for bash -n)
    heredoc: str = ""  # the body after <<'EOF', if any

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"

    @property
    def argv(self) -> list[str]:
        """The words after any ``NAME=value`` environment prefix."""
        words = shlex.split(self.text, comments=True)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        return words


# -- extraction -------------------------------------------------------------------------------


def block_commands(document: Path, first_line: int, lines: list[str], shell: bool) -> Iterator[Command]:
    """Commands of one fenced block: every line of a shell block, or the command-like lines of
    an unlabelled one."""
    block = "\n".join(lines)
    index = 0
    while index < len(lines):
        start, text = index, lines[index].strip()
        while text.endswith("\\") and index + 1 < len(lines):
            index += 1
            text = text[:-1].rstrip() + " " + lines[index].strip()
        index += 1
        if not text or text.startswith("#") or not (shell or INLINE_COMMAND.match(text)):
            continue
        heredoc = ""
        marker = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", text)
        if marker:
            end = next(i for i in range(index, len(lines)) if lines[i].strip() == marker.group(1))
            heredoc, index = "\n".join(lines[index:end]), end + 1
        for part in re.split(r"\s&&\s", text):
            yield Command(document, first_line + start, part.strip(), prose=False, block=block, heredoc=heredoc)


def document_commands(document: Path) -> Iterator[Command]:
    lines = document.read_text(encoding="utf-8").splitlines()
    prose: list[str] = []
    fence = None  # (language, indent, first line number, lines)
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = (stripped[3:].strip(), len(line) - len(line.lstrip()), number + 1, [])
            else:
                language, indent, first, body = fence
                if language in ("bash", "sh", ""):
                    yield from block_commands(document, first, body, shell=bool(language))
                fence = None
            prose.append("")
        elif fence is not None:
            fence[3].append(line[fence[1] :])
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        code = " ".join(span.group(1).split())
        if INLINE_COMMAND.match(code):
            yield Command(document, text.count("\n", 0, span.start()) + 1, code, prose=True)


ALL_COMMANDS = [command for document in DOCUMENTS for command in document_commands(document)]


# -- argparse: a whole command line, or a synopsis option by option ---------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((action for action in parser._actions if isinstance(action, argparse._SubParsersAction)), None)


def synopsis_problems(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """What in a synopsis or fragment the parser does not know: an option of the (sub-)command
    it names, or a sub-command (``{a,b}`` lists several)."""
    problems, chosen = [], False
    for word in words:
        word = word.strip("[]")
        if word in ("", "|", "...", "…"):
            continue
        if word.startswith("-"):
            for option in word.split("|"):
                name = option.strip("[]").split("=")[0]
                if name and name not in parser._option_string_actions:
                    problems.append(f"{parser.prog}: no option {name}")
            continue
        commands = _subparsers(parser)
        if commands is not None and not chosen:
            names = word.strip("{}").split(",") if word.startswith("{") else [word]
            unknown = [name for name in names if name not in commands.choices]
            if unknown:
                problems.append(
                    f"{parser.prog}: no sub-command {', '.join(unknown)} (has {', '.join(commands.choices)})"
                )
            elif len(names) == 1:
                parser = commands.choices[word]
            chosen = True
    return problems


#: How argparse says a line is incomplete rather than wrong.
INCOMPLETE = ("the following arguments are required", "expected one argument", "expected at least one argument")


def argv_problems(parser: argparse.ArgumentParser, words: list[str], fragment_allowed: bool) -> list[str]:
    """Why ``parser`` refuses ``words`` (empty when it accepts them). A synopsis, and where
    ``fragment_allowed`` a line that leaves out required arguments, is checked by option."""
    synopsis = any(word in ("...", "…") or word[:1] in "[{" or "|" in word for word in words)
    if synopsis:
        return synopsis_problems(parser, words)
    message = io.StringIO()
    with contextlib.redirect_stderr(message), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(words)
        except SystemExit as exit:
            if exit.code == 0:
                return []
            error = (message.getvalue().strip().splitlines() or [f"exit {exit.code}"])[-1]
            if fragment_allowed and any(phrase in error for phrase in INCOMPLETE):
                return synopsis_problems(parser, words)
            return [error]
    return []


# -- first-party imports, statically ----------------------------------------------------------


def module_file(name: str) -> Path | None:
    """The source of a first-party module in this checkout (``None`` if there is none)."""
    root, *rest = name.split(".")
    if root not in FIRST_PARTY:
        return None
    base = FIRST_PARTY[root].joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str | None:
    for root, folder in FIRST_PARTY.items():
        if path.is_relative_to(folder):
            parts = [root, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def defined_names(path: Path) -> frozenset[str]:
    """Names a module binds at its top level (in if/try blocks too), and what it star-imports."""
    names: set[str] = set()
    statements = list(parsed(path).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    source = module_file(absolute_module(node, module_name(path) or "", path))
                    names.update(defined_names(source) if source else ())
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for body in ("body", "orelse", "finalbody", "handlers"):
                statements.extend(getattr(node, body, []))
        elif isinstance(node, ast.ExceptHandler):
            statements.extend(node.body)
    return frozenset(names)


def absolute_module(node: ast.ImportFrom, importer: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return ".".join(part for part in (package, node.module) if part)


@dataclass
class ImportCheck:
    problems: list[str] = field(default_factory=list)
    #: Absolute first-party modules the entry file imports (for the resolve-at-run-time check).
    entry_imports: set[str] = field(default_factory=set)


def import_problems(entry: Path) -> ImportCheck:
    """Every first-party import in ``entry`` and in the first-party modules it reaches, at any
    depth and inside functions too: the module exists in this checkout and so does each name."""
    check, seen, queue = ImportCheck(), set(), [entry]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        importer = module_name(path) or ""
        for node in ast.walk(parsed(path)):
            wanted: list[tuple[str, str | None, int]] = []  # (module, name imported from it, line)
            if isinstance(node, ast.Import):
                wanted = [(alias.name, None, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level and not importer:
                    check.problems.append(f"{path.relative_to(REPO)}:{node.lineno}: relative import outside a package")
                    continue
                source = absolute_module(node, importer, path)
                wanted = [(source, alias.name, node.lineno) for alias in node.names]
            for module, name, line in wanted:
                if module.split(".")[0] not in FIRST_PARTY:
                    continue
                if path == entry:
                    check.entry_imports.add(module)
                where = f"{path.relative_to(REPO)}:{line}"
                source = module_file(module)
                if source is None:
                    check.problems.append(f"{where}: no module {module}")
                    continue
                for package_level in range(1, module.count(".") + 1):  # importing a.b.c runs a and a.b
                    queue.append(module_file(".".join(module.split(".")[:package_level])))
                queue.append(source)
                if name is None or name == "*" or name in defined_names(source):
                    continue
                submodule = module_file(f"{module}.{name}")
                if submodule is not None:
                    queue.append(submodule)
                elif "__getattr__" not in defined_names(source):
                    check.problems.append(f"{where}: {module} has no {name}")
    return check


# -- a module's or script's own parser, in a subprocess ---------------------------------------

#: Runs each documented module or script with each of its documented argument lists,
#: stopping in parse_args, where the parser the code built judges the arguments
#: (``argv_problems``, from this file); then resolves the entry file's first-party imports on
#: the path the code itself set up. One process for all of them (torch is imported once):
#: between two targets the path is restored and every module the checkout provides outside
#: src/ (the workbench, tests/ helpers) forgotten, so one target's set-up cannot help the next.
PARSE_ONLY = r"""
import argparse, contextlib, importlib.util, io, json, runpy, sys
from pathlib import Path

this_file, targets = json.loads(sys.argv[1])
repo = Path(this_file).resolve().parents[1]
spec = importlib.util.spec_from_file_location("documented_commands", this_file)
checks = sys.modules["documented_commands"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(checks)
original_parse_args = argparse.ArgumentParser.parse_args


class Judged(Exception):
    pass


def judge_and_stop(self, args=None, namespace=None):
    argparse.ArgumentParser.parse_args = original_parse_args
    try:
        problems = checks.argv_problems(self, sys.argv[1:] if args is None else list(args), fragment_allowed)
    finally:
        argparse.ArgumentParser.parse_args = judge_and_stop
    raise Judged(problems)


def provided_outside_src(module) -> bool:
    # The checkout's own modules outside src/ (the workbench, scripts); not an environment
    # that lives inside the checkout (.venv): a re-imported torch crashes the process.
    path = Path(getattr(module, "__file__", None) or "/").resolve()
    environment = Path(sys.prefix).resolve()
    return path.is_relative_to(repo) and not path.is_relative_to(repo / "src") and not path.is_relative_to(environment)


argparse.ArgumentParser.parse_args = judge_and_stop
report = []
for target, is_script, cases, imports in targets:
    saved_path = list(sys.path)
    if is_script:
        sys.path[0] = str(Path(target).resolve().parent)
    results = []
    for argv, fragment_allowed in cases:
        sys.argv = [target, *argv]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                if is_script:
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            results.append(["it ran to the end without parsing its arguments"])
        except Judged as judged:
            results.append(judged.args[0])
        except ModuleNotFoundError as error:
            results.append([f"missing-module {error.name}"])
    unresolved = []
    for name in imports:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            unresolved.append(name)
    report.append({"results": results, "unresolved": unresolved})
    sys.path[:] = saved_path
    for name, module in list(sys.modules.items()):
        if name != "documented_commands" and provided_outside_src(module):
            del sys.modules[name]
print(json.dumps(report))
"""


def first_party_python(command: Command) -> tuple[str, bool] | None:
    """``(module or script path, is_script)`` when ``command`` runs first-party Python."""
    argv = command.argv
    if len(argv) < 2 or argv[0] not in PYTHONS:
        return None
    if argv[1] == "-m" and len(argv) > 2 and argv[2].split(".")[0] in FIRST_PARTY:
        return argv[2], False
    if argv[1].endswith(".py"):
        return argv[1], True
    return None


def entry_file(target: str, is_script: bool) -> Path | None:
    if is_script:
        path = REPO / target
        return path if path.is_file() else None
    source = module_file(target)
    if source is not None and source.name == "__init__.py":
        main = source.with_name("__main__.py")
        return main if main.is_file() else None
    return source


def python_environment() -> dict[str, str]:
    """This checkout's flashvlm first on the path, whatever else is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def python_arguments(command: Command) -> list[str]:
    """The arguments a first-party module or script is given (after ``-m MODULE`` or ``SCRIPT``)."""
    argv = command.argv
    return argv[3:] if argv[1] == "-m" else argv[2:]


@pytest.fixture(scope="session")
def parse_results() -> dict[tuple[str, tuple[str, ...], bool], list[str]]:
    """Every documented (target, arguments, prose?) through the target's own parser, in one
    subprocess: the problems found, empty when the parser accepts them."""
    by_target: dict[tuple[str, bool], list[tuple[list[str], bool]]] = {}
    for command in ALL_COMMANDS:
        target = first_party_python(command)
        if target is not None and entry_file(*target) is not None:
            by_target.setdefault(target, []).append((python_arguments(command), command.prose))
    targets = [
        [target, is_script, cases, sorted(import_problems(entry_file(target, is_script)).entry_imports)]
        for (target, is_script), cases in by_target.items()
    ]
    done = subprocess.run(
        [sys.executable, "-c", PARSE_ONLY, json.dumps([__file__, targets])],
        cwd=REPO,
        env=python_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the parse-only run failed:\n{done.stderr[-3000:]}"
    results = {}
    for (target, _, cases, _), report in zip(targets, json.loads(done.stdout.strip().splitlines()[-1])):
        unresolved = [f"import {name} does not resolve when it runs" for name in report["unresolved"]]
        for (argv, prose), problems in zip(cases, report["results"]):
            results[(target, tuple(argv), prose)] = problems + unresolved
    return results


# -- the rules --------------------------------------------------------------------------------


@cache
def flashvlm_parser() -> argparse.ArgumentParser:
    from flashvlm.cli import build_parser

    return build_parser()


def check_flashvlm_cli(command: Command, request) -> None:
    words = command.argv[1:]
    problems = argv_problems(flashvlm_parser(), words, fragment_allowed=command.prose)
    assert not problems, f"{command.where}: `{command.text}`: " + "; ".join(problems)


def check_first_party_python(command: Command, request) -> None:
    target, is_script = first_party_python(command)
    entry = entry_file(target, is_script)
    assert entry is not None, f"{command.where}: `{command.text}`: no {'script' if is_script else 'module'} {target}"
    problems = import_problems(entry).problems
    assert not problems, f"{command.where}: `{command.text}`:\n" + "\n".join(problems)
    results = request.getfixturevalue("parse_results")
    problems = results[(target, tuple(python_arguments(command)), command.prose)]
    missing = [p.split()[1] for p in problems if p.startswith("missing-module ")]
    if missing and missing[0].split(".")[0] in OPTIONAL_ENGINES:
        pytest.skip(f"{target} imports {missing[0]} at start-up, which is not installed here")
    assert not problems, f"{command.where}: `{command.text}`: " + "; ".join(problems)


def check_heredoc(command: Command, request) -> None:
    done = subprocess.run(
        [sys.executable, "-"],
        input=command.heredoc,
        cwd=REPO,
        env=python_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{command.where}: the snippet failed:\n{done.stderr[-3000:]}"


def check_make(command: Command, request) -> None:
    targets = [word for word in command.argv[1:] if not word.startswith("-") and "=" not in word]
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command.where}: `{command.text}`: {done.stderr.strip()}"


def check_bash_script(command: Command, request) -> None:
    script = REPO / command.argv[1]
    assert script.is_file(), f"{command.where}: `{command.text}`: no script {command.argv[1]}"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, f"{command.where}: {command.argv[1]}: {done.stderr.strip()}"


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def entry_point_problems(group: str, name: str) -> list[str]:
    """The entry point exists in pyproject.toml and its target ``module:attribute`` does too."""
    declared = pyproject()["project"].get("entry-points", {}).get(group, {})
    if name not in declared:
        return [f"pyproject.toml declares no {name!r} in entry-point group {group!r}"]
    module, _, attribute = declared[name].partition(":")
    source = module_file(module)
    if source is None or attribute not in defined_names(source):
        return [f"entry point {group}:{name} = {declared[name]} does not resolve"]
    return []


def option_value(argv: list[str], option: str) -> str | None:
    for index, word in enumerate(argv):
        if word == option and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def check_lmms_eval(command: Command, request) -> None:
    from flashvlm.errors import FlashVLMError
    from flashvlm.selection import get_method, parse_budget

    argv = command.argv
    model = option_value(argv, "--model")
    problems = entry_point_problems("lmms_eval.models", model) if model else []
    model_args = option_value(argv, "--model_args")
    if model == "flashvlm" and model_args:
        arguments = dict(item.split("=", 1) for item in model_args.split(","))
        model_source = module_file("flashvlm.integrations.lmms_eval.model")
        init = next(
            node
            for node in ast.walk(parsed(model_source))
            if isinstance(node, ast.FunctionDef) and node.name == "__init__"
        )
        accepted = {arg.arg for arg in init.args.args + init.args.kwonlyargs}
        literal = {key: value for key, value in arguments.items() if "$" not in value}
        method_params = {key: value for key, value in literal.items() if key not in accepted}
        try:
            if "method" in literal:
                get_method(literal["method"], **method_params)
            if "budget" in literal:
                parse_budget(literal["budget"])
        except FlashVLMError as error:
            problems.append(f"--model_args {model_args}: {error}")
    assert not problems, f"{command.where}: `{command.text}`: " + "; ".join(problems)


def check_vllm_serve(command: Command, request) -> None:
    from flashvlm.integrations.vllm.settings import CONFIG_KEY, parse_settings

    overrides = option_value(command.argv, "--hf-overrides")
    assert overrides is not None, f"{command.where}: `{command.text}`: no --hf-overrides (nothing of ours to check)"
    settings = json.loads(overrides)
    assert CONFIG_KEY in settings, f"{command.where}: --hf-overrides has no {CONFIG_KEY!r} entry"
    parse_settings(settings[CONFIG_KEY])
    problems = entry_point_problems("vllm.general_plugins", "flashvlm")
    assert not problems, f"{command.where}: " + "; ".join(problems)


def check_vllm_request(command: Command, request) -> None:
    """A ``curl`` request to a vLLM server: its JSON body's ``mm_processor_kwargs["flashvlm"]``
    are valid per-request settings over the settings of the ``vllm serve`` line before it."""
    from flashvlm.integrations.vllm.settings import CONFIG_KEY, request_settings

    body = option_value(command.argv, "-d") or option_value(command.argv, "--data")
    assert body is not None, f"{command.where}: `{command.text}`: no -d JSON body (nothing of ours to check)"
    settings = json.loads(body).get("mm_processor_kwargs", {}).get(CONFIG_KEY)
    assert settings is not None, f"{command.where}: the request has no mm_processor_kwargs[{CONFIG_KEY!r}]"
    servers = [
        other
        for other in ALL_COMMANDS
        if other.document == command.document and other.line < command.line and other.argv[:2] == ["vllm", "serve"]
    ]
    assert servers, f"{command.where}: no `vllm serve` line before the request to take the engine's settings from"
    server = max(servers, key=lambda other: other.line)
    engine = json.loads(option_value(server.argv, "--hf-overrides"))[CONFIG_KEY]
    request_settings(engine, settings)
    assert "--trust-request-mm-kwargs" in server.argv, (
        f"{server.where}: vLLM's server refuses a request's mm_processor_kwargs without --trust-request-mm-kwargs"
    )


def check_pip_install(command: Command, request) -> None:
    """``flashvlm[extra]`` names extras pyproject.toml has; another package pinned with ``==``
    is pinned at that version in a lock."""
    locks = "\n".join(path.read_text(encoding="utf-8") for path in (REPO / "locks").glob("*.txt"))
    for requirement in (word for word in command.argv[2:] if not word.startswith("-")):
        name, extras, pin = re.fullmatch(r"([\w.-]+)(?:\[([\w,-]+)\])?(?:==(\S+))?", requirement).groups()
        if name == "flashvlm":
            missing = set((extras or "").split(",")) - set(pyproject()["project"]["optional-dependencies"]) - {""}
            assert not missing, f"{command.where}: pyproject.toml has no extra {', '.join(sorted(missing))}"
        elif pin:
            assert re.search(rf"^{re.escape(name)}=={re.escape(pin)}\b", locks, re.M), (
                f"{command.where}: {name}=={pin} is pinned in no lock under locks/"
            )


def check_shell(command: Command, request) -> None:
    done = subprocess.run(["bash", "-n"], input=command.block, capture_output=True, text=True)
    assert done.returncode == 0, f"{command.where}: its block is not valid bash: {done.stderr.strip()}"


def is_shell_syntax(command: Command) -> bool:
    words = shlex.split(command.text)
    return bool(command.block) and (
        not command.argv or words[0] in ("export", "for", "do", "done", "while", "if", "fi", "then")
    )


#: (name, claims the command, check). The first that claims a command checks it.
RULES: list[tuple[str, Callable[[Command], bool], Callable]] = [
    ("flashvlm-cli", lambda c: c.argv[:1] in (["flashvlm"], [".venv/bin/flashvlm"]), check_flashvlm_cli),
    ("heredoc-python", lambda c: bool(c.heredoc) and c.argv[:2] in ([p, "-"] for p in PYTHONS), check_heredoc),
    ("first-party-python", lambda c: first_party_python(c) is not None, check_first_party_python),
    (
        "lmms-eval",
        lambda c: len(c.argv) > 2 and c.argv[0] in PYTHONS and c.argv[1:3] == ["-m", "lmms_eval"],
        check_lmms_eval,
    ),
    ("make", lambda c: c.argv[:1] == ["make"], check_make),
    ("bash-script", lambda c: c.argv[:1] == ["bash"] and len(c.argv) > 1, check_bash_script),
    ("vllm-serve", lambda c: c.argv[:2] == ["vllm", "serve"], check_vllm_serve),
    ("vllm-request", lambda c: c.argv[:1] == ["curl"] and "/v1/" in c.text, check_vllm_request),
    ("pip-install", lambda c: c.argv[:2] == ["pip", "install"], check_pip_install),
    ("shell", is_shell_syntax, check_shell),
]


def rule_of(command: Command) -> str | None:
    return next((name for name, claims, _ in RULES if claims(command)), None)


def unchecked_reason(command: Command) -> str | None:
    return next((reason for pattern, reason in UNCHECKED.items() if re.search(pattern, command.text)), None)


CHECKED = [command for command in ALL_COMMANDS if rule_of(command) and not unchecked_reason(command)]


def case_ids(commands: list[Command]) -> list[str]:
    """``file:line:rule``, numbered where one line holds several commands."""
    ids = [f"{command.where}:{rule_of(command)}" for command in commands]
    return [name if ids.count(name) == 1 else f"{name}#{ids[:index].count(name) + 1}" for index, name in enumerate(ids)]


def test_every_documented_command_has_a_check():
    uncovered = [
        f"{command.where}: `{command.text}`"
        for command in ALL_COMMANDS
        if rule_of(command) is None and unchecked_reason(command) is None
    ]
    assert not uncovered, "commands no rule checks (add a rule, or an UNCHECKED entry with its reason):\n" + "\n".join(
        uncovered
    )


def test_every_unchecked_entry_still_names_a_command():
    stale = [pattern for pattern in UNCHECKED if not any(re.search(pattern, c.text) for c in ALL_COMMANDS)]
    assert not stale, f"UNCHECKED entries that match no documented command: {stale}"


@pytest.mark.parametrize("command", CHECKED, ids=case_ids(CHECKED))
def test_documented_command(command: Command, request):
    check = next(check for name, _, check in RULES if name == rule_of(command))
    check(command, request)
