"""The README and docs/ an admin follows must be true: each configuration default, `pacsgw` command and flag,
link and metric they name exists as written. Parsing only (no agent runs): a few seconds."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import io
import itertools
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from agent import config
from agent.cli import build_parser

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
# the docs an admin reads; benchmarks.md and replay.md are measurement logs, their commands of their day
DOCS = [README, *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in ("benchmarks.md", "replay.md"))]
# a config that leaves out every key it can: the README's `<cache.dir>` and `<uplink.prefix>` are its values
MINIMAL = """
[cache]
dir = "cache"
[uplink]
endpoint_url = "http://127.0.0.1:8333"
bucket = "pacs"
prefix = "site-a/"
access_key_id = "EXAMPLEACCESSKEY"
secret_access_key = "EXAMPLESECRETKEY0123456789"
[[users]]
name = "pacs"
password = "test-only"
"""


def config_rows(text: str) -> list[tuple[str, str, str, int]]:
    """(section, key, default cell, line number) of each `| `key` | default | meaning |` row of the configuration
    reference, under its `### `[section]`` heading."""
    rows, section = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if m := re.match(r"#{2,3} `\[\[?([a-z]+)\]?\]`", line):
            section = m.group(1)
        elif line.startswith("#"):
            section = None
        elif section and (m := re.match(r"\|\s*(`[a-z_]+`(?:,\s*`[a-z_]+`)*)\s*\|\s*([^|]*?)\s*\|", line)):
            for key in re.findall(r"`([a-z_]+)`", m.group(1)):
                rows.append((section, key, m.group(2), number))
    return rows


def documented_value(cell: str, cfg: config.Config) -> object:
    """The value a default cell states, as TOML would give it: its first `code` span; None for '—' (no default)."""
    if cell.startswith("—"):
        return None
    m = re.match(r"`([^`]*)`", cell)
    assert m, f"no `value` in the default cell {cell!r}"
    text = m.group(1).replace("<cache.dir>", str(cfg.cache.dir)).replace("<uplink.prefix>", cfg.uplink.prefix)
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as adaptive or 127.0.0.1:2121


def _tuples(value: object) -> object:
    return tuple(map(_tuples, value)) if isinstance(value, list | tuple) else value


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> config.Config:
    path = tmp_path_factory.mktemp("docs") / "agent.toml"
    path.write_text(MINIMAL)
    path.chmod(0o600)
    return config.load(path)


def test_readme_config_defaults_are_the_code_defaults(loaded):
    """Each row's default, read through the key's own parser, is what a config that leaves the key out loads."""
    rows = config_rows(README.read_text())
    classes = {**config._SECTIONS, "users": config.UserConfig}
    assert {s for s, *_ in rows} == set(classes), "a section's table is missing from the README or not recognised"
    given, wrong = tomllib.loads(MINIMAL), []
    for section, key, cell, number in rows:
        fields = {f.name: f for f in dataclasses.fields(classes[section])}
        if key not in fields:
            wrong.append(f"README.md:{number}: [{section}] {key}: no such key")
            continue
        f, stated = fields[key], documented_value(cell, loaded)
        if stated is None:  # '—': required, or no default worth stating (the S3 keys: these or credentials_file)
            if "required" in cell and f.default is not dataclasses.MISSING:
                wrong.append(f"README.md:{number}: [{section}] {key} is documented as required but has a default")
            continue
        # what a config leaving the key out loads (paths under cache.dir filled in); for a key MINIMAL gives, the
        # field's own default
        mine = section == "users" or key in given.get(section, {})
        actual = f.default if mine else getattr(getattr(loaded, section), key)
        try:
            parsed = f.metadata["parse"](stated)
        except (ValueError, TypeError) as e:
            wrong.append(f"README.md:{number}: [{section}] {key}: default {stated!r} is not a valid value ({e!r})")
            continue
        if _tuples(parsed) != _tuples(actual):
            wrong.append(f"README.md:{number}: [{section}] {key}: README says {stated!r}, the code's default is "
                         f"{actual!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("example", ["examples/agent.toml", "image/config-partition/agent.toml.example"])
def test_example_sections_in_the_readme_order(example):
    """An example configuration's sections come in the order the README documents them."""
    order = list(dict.fromkeys(s for s, *_ in config_rows(README.read_text())))
    sections = re.findall(r"^\[\[?([a-z]+)\]?\]", (ROOT / example).read_text(), flags=re.M)
    assert sections == sorted(sections, key=order.index), f"README order: {order}"


def _code(path: Path) -> list[tuple[str, int]]:
    """The code an admin reads in a doc, with its line number: each line of a code block (its # comment left out)
    and each `code span` (which may wrap onto the next line)."""
    found, prose, in_block = [], [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block:
            found.append((line.split(" #", 1)[0], number))
        else:
            prose.append((line, number))
    text = "\n".join(line for line, _ in prose)
    starts = list(itertools.accumulate((len(line) + 1 for line, _ in prose), initial=0))
    for m in re.finditer(r"`([^`]+)`", text):
        found.append((m.group(1).replace("\n", " "), prose[bisect.bisect_right(starts, m.start()) - 1][1]))
    return found


def _commands(path: Path) -> list[tuple[str, int]]:
    """Each `pacsgw <subcommand> ...` shown, with its line number."""
    return [(m.group(1).rstrip("\\ "), number) for code, number in _code(path)
            if (m := re.search(r"(?:^|[\s/])pacsgw ([a-z][a-z-]*(?:\s.*)?)$", code))]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """argparse's complaint about argv, '' when it is accepted (a command shown without its required arguments
    passes: prose names `pacsgw simulate` without a trace)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code and "the following arguments are required" not in err.getvalue():
            return err.getvalue().strip().splitlines()[-1]
    return ""


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_parse(doc):
    """Every `pacsgw ...` is a real subcommand and argparse accepts its flags: placeholders (FILE, PATH...) stay
    as words, `[--x y]` options and `a | b` alternatives are all given at once."""
    parser, wrong = build_parser(), []
    for command, number in _commands(doc):
        words = shlex.split(command.replace("[", " ").replace("]", " ").replace("...", ""))
        argv = [w for w in words if w != "|"]
        if (why := _parse(parser, argv)):
            wrong.append(f"{doc.name}:{number}: pacsgw {command}: {why}")
    assert not wrong, "\n".join(wrong)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its subcommands, at any depth."""
    found = set(parser._option_string_actions)
    for action in parser._subparsers._actions if parser._subparsers else ():
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            found |= _options(sub)
    return found


def test_readme_flags_exist():
    """A flag the README names on its own (`--remote` also checks …) is an option of some `pacsgw` command."""
    options = _options(build_parser())
    wrong = [f"README.md:{number}: {code}" for code, number in _code(README)
             if (m := re.match(r"--[a-z][a-z-]*", code)) and m.group(0) not in options]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_make_targets_exist(doc):
    """Every `make <target>` shown is a target of the Makefile."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    wrong = [f"{doc.name}:{number}: make {m.group(1)}" for code, number in _code(doc) if not code.startswith("apt")
             for m in re.finditer(r"(?:^|[\s;&|(])make ([a-z][\w-]*)", code) if m.group(1) not in targets]
    assert not wrong, "\n".join(wrong)


# the repository's own directories: a path a doc names under one of them must exist (run/, build/ are made later)
TOP = ("agent", "bench", "docs", "tests", "models", "ansible", "image", "examples", ".ci")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_repo_paths_resolve(doc):
    """A Markdown link to a file, and a `path` in the repository a doc names (docs/…, agent/…, bench/…), exists;
    a link's #anchor is a heading of its target."""
    wrong = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            file = doc.parent / name if name else doc
            if not file.exists():
                wrong.append(f"{doc.name}:{number}: link {target}: no such file")
            elif anchor and anchor not in _anchors(file.read_text()):
                wrong.append(f"{doc.name}:{number}: link {target}: no such heading")
        for path in re.findall(REPO_PATH, line):
            path = next(p for p in path if p).rstrip("/.")
            if path.split("/", 1)[0] in TOP and "<" not in path and not (ROOT / path).exists():
                wrong.append(f"{doc.name}:{number}: {path}: no such file in the repository")
    assert not wrong, "\n".join(wrong)


# a `path/in/backticks`, or a file under docs/, bench/ or models/ named in prose
REPO_PATH = r"`((?:\.?[a-z]+/)[\w./-]*)`|(?<![\w/.-])((?:docs|bench|models)/[\w/.-]*\.[\w.-]*\w)"


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_metrics_named_exist():
    """Every `pacsgw_…` metric the docs name is one the agent defines (a counter `x` is exposed as `x_total`); the
    fleet's Ansible variables share the prefix and are not metrics."""
    source = "\n".join(p.read_text() for p in (ROOT / "agent").rglob("*.py"))
    defined = set(re.findall(r"[\"'](pacsgw_[a-z0-9_]+)[\"']", source))
    fleet = "\n".join(p.read_text() for d in ("ansible", "image") for p in (ROOT / d).rglob("*.yml"))
    variables = set(re.findall(r"\{\{\s*(pacsgw_\w+)|^\s*(pacsgw_\w+):", fleet, flags=re.M))
    variables = {v for pair in variables for v in pair if v}
    wrong = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for name in re.findall(r"`(pacsgw_[a-z0-9_]+)", line):
                if name not in defined | variables and name.removesuffix("_total") not in defined:
                    wrong.append(f"{doc.name}:{number}: {name}")
    assert not wrong, "metrics named in the docs that the agent does not define:\n" + "\n".join(wrong)
