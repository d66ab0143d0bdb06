"""The CLI reference, generated from the Typer app when the site is built: it cannot drift from the code.

mkdocs runs :func:`on_page_markdown` on every page; a page holding the marker line
``<!-- cli-reference -->`` gets it replaced by :func:`render` of ``posthoc_cli.cli.main.app``:
every command (and sub-command) with its usage, help text, arguments and options, as
``posthoc-ema COMMAND --help`` knows them. tests/test_docs.py checks the result lists every
option of every command, without a list of commands of its own.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- cli-reference -->"


def _text(text: str) -> str:
    """Help text as Markdown text: brackets and angle brackets shown, not read as links or HTML."""
    return text.replace("[", "\\[").replace("<", "&lt;")


def _cell(text: str) -> str:
    """Help text in one Markdown table cell: one line, pipes escaped."""
    return " ".join(_text(str(text)).split()).replace("|", "\\|")


def _row(param: Any, ctx: Any) -> str | None:
    """One table row from the record ``--help`` prints for the parameter (None for a hidden one)."""
    record = param.get_help_record(ctx)
    if record is None:
        return None
    names, help_text = record
    unescape = {ord("\\"): None}  # Rich's markup escapes (\\[) are not part of the text
    names = " ".join(names.translate(unescape).split()).replace("|", "\\|")
    return f"| `{names}` | {_cell(help_text.translate(unescape))} |"


def _command(command: Any, path: str, parent: Any, level: int) -> list[str]:
    import typer  # the app's own Click, whichever Typer runs on

    ctx = typer.Context(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"{'#' * level} `{path}`", "", "```text", f"{path} {usage}".rstrip(), "```", ""]
    help_text = (command.help or "").replace("\b\n", "")
    if help_text:
        lines += [_text(help_text.strip()), ""]
    params = command.get_params(ctx)
    if params:
        rows = [row for row in map(lambda p: _row(p, ctx), params) if row is not None]
        lines += ["| argument or option | what it does |", "|---|---|", *rows, ""]
    if command.epilog:
        lines += [_text(command.epilog.strip()), ""]
    for name, sub in getattr(command, "commands", {}).items():  # a group: each sub-command in registration order
        if not getattr(sub, "hidden", False):
            lines += _command(sub, f"{path} {name}", ctx, min(level + 1, 4))
    return lines


def render(app: Any, prog: str = "posthoc-ema") -> str:
    """Markdown for every command of ``app`` (a Typer app), in the order ``--help`` lists them."""
    import typer

    return "\n".join(_command(typer.main.get_command(app), prog, None, 2))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from posthoc_cli.cli.main import app

    return markdown.replace(MARKER, render(app))
