"""What both command-line apps (`embed`, `decoder`) share: consoles, one-line errors, progress.

Imports only typer, click and rich, so that ``--help`` and a refused option answer at once: the
commands import torch, zarr and their own modules inside their functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)  # progress, warnings and errors
stdout = Console(soft_wrap=True, highlight=False)  # summaries: one line per fact (greppable)

# Options users type from habit (other tools, older tutorials) -> the option samcache has.
OPTION_ALIASES = {
    "--batch-size": ("--images-per-step", "--batch-size"),
    "--bs": ("--images-per-step", "--batch-size"),
    "--learning-rate": ("--lr",),
    "--num-epochs": ("--epochs",),
    "--ckpt": ("--checkpoint",),
    "--output": ("--out",),
    "--output-dir": ("--out",),
    "--image-dir": ("--images",),
    "--model": ("--model-type",),
}


class SuggestingCommand(typer.core.TyperCommand):
    """A command whose "No such option" names the option meant, not the closest spelling.

    Click suggests by spelling (``--batch-size`` → ``--cache``); a known alias suggests the
    option of this command that does that job (``--batch-size`` → ``--images-per-step``).
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # typer may bring its own click: match the class by name
            if type(exc).__name__ != "NoSuchOption":
                raise
            mine = {name for param in self.params for name in getattr(param, "opts", [])}
            meant = [o for o in OPTION_ALIASES.get(exc.option_name, ()) if o in mine]
            if meant:
                exc.possibilities = meant[:1]
            raise


def explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the options the user typed (or set through the environment)."""
    given = {"COMMANDLINE", "ENVIRONMENT"}  # by name: typer may bring its own click
    return {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "") in given}


def one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised by a DataLoader worker (whose message is
    "Caught X in DataLoader worker…" + the worker's traceback), the original message only."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def print_error(text: str) -> None:
    console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


def warn(text: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)


@contextmanager
def user_errors(
    exit_codes: dict[type[BaseException] | str, int] | None = None,
    interrupted: Callable[[], str] | None = None,
) -> Iterator[None]:
    """Errors a user can fix → one line without a traceback.

    ``exit_codes``: exception types (or class names, so that the command need not import the
    module that defines them) with their own exit code; ValueError and OSError (config, cache,
    checkpoint, file errors) exit 2. Ctrl-C exits 130 after the line
    ``interrupted()`` gives (e.g. how to resume).
    """
    special = tuple((exit_codes or {}).items())

    def code_of(exc: BaseException, default: int | None) -> int | None:
        names = {kind.__name__ for kind in type(exc).__mro__}
        for kind, code in special:
            if (kind in names) if isinstance(kind, str) else isinstance(exc, kind):
                return code
        return default

    try:
        yield
    except (ValueError, OSError) as exc:
        code = code_of(exc, 2)
        print_error(one_line(exc))
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        console.print(escape(f"interrupted{interrupted() if interrupted else ''}"), highlight=False)
        raise typer.Exit(130) from None
    except BaseException as exc:
        code = code_of(exc, None)
        if code is None:
            raise
        print_error(one_line(exc))
        raise typer.Exit(code) from None


def progress_columns(label: str = "{task.description:>9}", info: str = "") -> tuple:
    """The columns of every samcache progress bar (label, bar, n/N, info, elapsed, left)."""
    extra = (TextColumn(info),) if info else ()
    return (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def progress(*columns: object) -> Progress:
    """A rich progress bar on stderr, shown only on a terminal (logs and CI stay clean)."""
    return Progress(
        *columns or progress_columns(), console=console, disable=not console.is_terminal
    )
