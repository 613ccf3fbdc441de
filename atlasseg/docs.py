"""Reference documentation generated from the code: ``docs/configuration.md`` and ``docs/cli.md``.

::

    python -m atlasseg.docs            # (re)write both from the code
    python -m atlasseg.docs --check    # exit 1, naming the file, when either is out of date

The configuration reference lists every key of :class:`atlasseg.config.Config` with the type the
loader accepts, its default, its unit and its meaning, taken from the numpydoc ``Parameters``
section of each config dataclass's docstring. The CLI reference is the ``--help`` of every
command, as argparse prints it at a fixed width of 100 columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import platform
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config, type_name

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "python -m atlasseg.docs"
_WIDTH = "100"
_ENTRY = re.compile(r"^(?P<names>\w+(?:, \w+)*) : (?P<spec>.+)$")


@dataclass(frozen=True)
class Parameter:
    """One entry of a numpydoc ``Parameters`` section: ``name : type, unit`` then its meaning."""

    type: str
    unit: str
    text: str


def _sections(cls) -> tuple[str, list[str]]:
    """(summary before the Parameters section, the section's lines) of ``cls``'s docstring."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    end = next(
        (i for i, line in enumerate(lines[:-1]) if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}),
        len(lines),
    )
    return " ".join(line.strip() for line in lines[:end] if line.strip()), lines[end + 2 :]


def parameters(cls) -> dict[str, Parameter]:
    """Field name → :class:`Parameter`, from the numpydoc ``Parameters`` section of ``cls``'s docstring;
    ``a, b : list`` documents both ``a`` and ``b``."""
    found: dict[str, Parameter] = {}
    names: list[str] = []
    spec, text = "", []

    def flush():
        kind, _, unit = spec.partition(", ")
        for name in names:
            found[name] = Parameter(kind.strip(), unit.strip(), " ".join(text))

    for line in _sections(cls)[1]:
        match = _ENTRY.match(line)
        if match:
            flush()
            names, spec, text = match["names"].split(", "), match["spec"], []
        elif line.startswith(" ") and names:
            text.append(line.strip())
        elif line.strip():  # the next section (Notes, ...) ends this one
            break
    flush()
    return found


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _walk(cls=Config, prefix: str = ""):
    """(dotted section name, its dataclass) for ``cls`` and every nested section, parents first."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            yield from _walk(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)


def undocumented(cls=Config) -> list[str]:
    """Dotted keys of config fields missing from their class's Parameters section, and documented names that
    are no field (``section.name (documented, not a field)``)."""
    problems = []
    for prefix, section in _walk(cls):
        hints = typing.get_type_hints(section)
        keys = {f.name for f in dataclasses.fields(section) if not _is_section(hints[f.name])}
        documented = set(parameters(section))
        problems += [f"{prefix}.{k}" for k in sorted(keys - documented)]
        problems += [f"{prefix}.{k} (documented, not a field)" for k in sorted(documented - keys)]
    return problems


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    text = yaml.safe_dump([list(value) if isinstance(value, tuple) else value], default_flow_style=True, width=1000)
    return text.strip()[1:-1]


def _markdown(text: str) -> str:
    """RST inline markup as Markdown, safe inside a table cell."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def configuration_reference() -> str:
    """``docs/configuration.md``: every config key with its type, default, unit and meaning."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from atlasseg/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "A config is a YAML file with one mapping per section. A file holds only the keys it changes; the others",
        "take the defaults below, which are also written out in `configs/default.yaml`. On the command line,",
        "`--set section.key=value` overrides one key (the value is read as YAML: `--set selection.k=5`,",
        "`--set registration.affine.stages=[rigid,affine]`); in Python, pass `overrides=[...]` or a dict.",
        "Presets are named instead of a file: `default`, `fast`, `accurate`, `demo`, `baseline`.",
        "Unknown keys, wrong types and out-of-range values are refused before any work, naming the key.",
        "",
        "Types are what the loader accepts: `'a' or 'b'` lists the allowed strings, `list of int` a YAML",
        "list, `null` YAML's null (`~`).",
    ]
    for prefix, section in _walk():
        if not prefix:
            continue
        hints = typing.get_type_hints(section)
        documented = parameters(section)
        out += [
            "",
            f"## `{prefix}`",
            "",
            _markdown(_sections(section)[0]),
            "",
            "| key | type | default | unit | meaning |",
            "| --- | --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(section):
            if _is_section(hints[f.name]):
                continue
            entry = documented.get(f.name, Parameter("", "", "(undocumented)"))
            out.append(
                f"| `{prefix}.{f.name}` | {_markdown(type_name(hints[f.name]))} | `{_default(f)}` | "
                f"{entry.unit} | {_markdown(entry.text)} |"
            )
        nested = [f.name for f in dataclasses.fields(section) if _is_section(hints[f.name])]
        if nested:
            out += ["", "Subsections: " + ", ".join(f"[`{prefix}.{n}`](#{prefix}{n})" for n in nested) + "."]
    return "\n".join(out) + "\n"


def _subcommands(parser: argparse.ArgumentParser):
    """(parser) for ``parser`` and every subcommand below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _subcommands(sub)


def cli_reference() -> str:
    """``docs/cli.md``: the ``--help`` of ``atlasseg`` and of every subcommand."""
    from .cli import build_parser

    version = platform.python_version_tuple()[:2]
    out = [
        "# Command-line reference",
        "",
        f"<!-- Generated from atlasseg/cli.py by `{REGENERATE}` with Python {'.'.join(version)}; do not edit by hand. -->",
        "",
        "Every command prints one line on stderr and exits with 2 on bad input (`--debug` shows the traceback).",
        "The global options (`--debug`, `-q`, `-v`, `--log-file`) go before or after the command",
        "(`atlasseg -q run ...` or `atlasseg run ... -q`).",
        "The options of the configuration are in [configuration.md](configuration.md).",
    ]
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH  # argparse wraps at the terminal's width
    try:
        for parser in _subcommands(build_parser()):
            out += ["", f"## `{parser.prog}`", "", "```text", parser.format_help().rstrip(), "```"]
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(out) + "\n"


REFERENCES = {"configuration.md": configuration_reference, "cli.md": cli_reference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlasseg.docs", description="Write docs/configuration.md and docs/cli.md from the code."
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder (default: the checkout's docs/)")
    args = parser.parse_args(argv)
    stale = []
    for name, generate in REFERENCES.items():
        path, text = args.out / name, generate()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            from .imageio import atomic_write_text

            atomic_write_text(path, text)
            print(f"wrote {path}")
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
