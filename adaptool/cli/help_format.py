"""How ``--help`` is drawn: Click's plain formatter, not Typer's rich panels.

Rich markup would eat square brackets (``org/name[@rev]`` showed as ``org/name``) and Typer's panels print a
``<bool>`` type after every flag; the plain formatter prints help strings literally, shows flags bare, and
writes no ANSI escape into a pipe. This group also lists each command's whole one-sentence summary, where
Click would cut it at the terminal's width with "...", and keeps the indented example lines of an epilog
whole, so that they can be copied as they are.
"""

from __future__ import annotations

from typer.core import TyperGroup

HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def verbatim_examples(epilog: str) -> str:
    """Mark each indented paragraph (an example command line) with Click's no-rewrap marker ``\\b``."""
    paragraphs = epilog.split("\n\n")
    return "\n\n".join("\b\n" + p if p[:1].isspace() else p for p in paragraphs)


class PlainHelpGroup(TyperGroup):
    """The ``adaptool`` group: Click's plain help, with every command's summary in full (wrapped)."""

    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None and cmd.epilog and "\b" not in cmd.epilog:
            cmd.epilog = verbatim_examples(cmd.epilog)
        return cmd

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
