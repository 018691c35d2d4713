"""The command-line reference in docs/cli.md, rendered from the click commands themselves, so
that it cannot drift from them (tests/test_docs.py compares the two).

    python -m edge_slm.commands.doc          # rewrite the generated parts of docs/cli.md
    python -m edge_slm.commands.doc --check  # exit 1 when they differ from the commands

docs/cli.md keeps its hand-written prose; only the text between the `<!-- generated: NAME -->`
and `<!-- end generated: NAME -->` markers is rendered here: `summary` (one line per command)
and `reference` (every command's usage, arguments and options with their help).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
REGENERATE = "python -m edge_slm.commands.doc"


def _cell(text: str) -> str:
    """Help text as one table cell: one line, `|` and `<` escaped (a cell ends at `|`; `<target>` would be an HTML tag)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def _code(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _contexts():
    from edge_slm.cli import cli

    root = click.Context(cli, info_name="edge-slm")
    for name, command in cli.commands.items():
        yield name, command, click.Context(command, info_name=name, parent=root)


def _summary() -> str:
    lines = ["| command | what it does |", "|---|---|"]
    for name, command, _ in _contexts():
        lines.append(f"| [`edge-slm {name}`](#edge-slm-{name}) | {_cell(command.get_short_help_str(limit=200))} |")
    return "\n".join(lines)


def _reference() -> str:
    from edge_slm.cli import cli

    root = click.Context(cli, info_name="edge-slm")
    out = [
        "Before the command (`edge-slm --debug build ...`): "
        + ", ".join(f"`{_code(r[0])}` ({_cell(r[1])})" for r in _options(cli, root))
        + "."
    ]
    for name, command, ctx in _contexts():
        out += ["", f"### edge-slm {name}", "", f"`{ctx.command_path} {' '.join(command.collect_usage_pieces(ctx))}`"]
        if command.help:
            out += ["", click.unstyle(command.help).replace("\b\n", "").strip()]
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        options = _options(command, ctx)
        if arguments or options:
            out += ["", "| argument or option | meaning |", "|---|---|"]
        for argument in arguments:
            required = "required" if argument.required else "optional"
            many = ", repeatable" if argument.nargs == -1 else ""
            out.append(f"| `{argument.make_metavar(ctx)}` | {required}{many} |")
        out += [f"| `{_code(opts)}` | {_cell(text)} |" for opts, text in options]
    return "\n".join(out)


def _options(command: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    """(options, help) as `--help` prints them, help flags left out."""
    records = [p.get_help_record(ctx) for p in command.params if isinstance(p, click.Option)]
    return [r for r in records if r is not None]


PARTS = {"summary": _summary, "reference": _reference}


def render(document: str) -> str:
    """`document` with each generated part replaced by its current rendering."""
    for part, make in PARTS.items():
        pattern = re.compile(rf"(<!-- generated: {part} -->\n).*?(<!-- end generated: {part} -->)", re.S)
        if not pattern.search(document):
            raise ValueError(f"{CLI_DOC} has no `<!-- generated: {part} -->` ... `<!-- end generated: {part} -->`")
        document = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), document)
    return document


def main(argv: list[str]) -> int:
    from edge_slm.core.atomic import write_text

    current = CLI_DOC.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{CLI_DOC} differs from the commands: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        write_text(CLI_DOC, wanted)
        print(f"rewrote {CLI_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
