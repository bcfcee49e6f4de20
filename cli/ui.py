"""Rich output helpers: progress adapter for pipeline callbacks, tables, error handling."""
from __future__ import annotations

import functools
import os
import sys

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text



def _console(stderr: bool) -> Console:
    """A rich console. Where the stream is no terminal (`dvc repro` logs, pipes) and COLUMNS is
    unset, rich would wrap at 80 columns, putting a progress line's value on a line of its own:
    there lines get 160 columns."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if tty or "COLUMNS" in os.environ else 160)


console = _console(stderr=False)
err_console = _console(stderr=True)


class RateColumn(ProgressColumn):
    """Samples per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} samples/s", style="cyan")


class RichProgress:
    """Adapter: pipeline stages call progress(event, **kw); this draws rich progress bars.

    Events: start(desc, total) · advance(n) · log(message) · end().
    """

    def __init__(self):
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, event: str, **kw) -> None:
        if event == "start":
            self.task = self.progress.add_task(kw.get("desc", ""), total=kw.get("total"))
        elif event == "advance" and self.task is not None:
            self.progress.update(self.task, advance=kw.get("n", 1))
        elif event == "log":
            self.progress.console.print(f"  {kw['message']}", style="dim", highlight=False, soft_wrap=True)
        elif event == "end" and self.task is not None:
            self.progress.stop_task(self.task)
            self.task = None


def table(title: str, columns: list[str], rows) -> Table:
    """A summary table; the title is printed above it, never wrapped to the table's width."""
    t = Table(title=title, title_justify="left", title_style="bold", header_style="bold",
              min_width=min(len(title), 100))
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return "" if v is None else str(v)


def _is_cli_control(e: BaseException) -> bool:
    """Typer/Click control-flow exceptions (Exit, Abort, usage errors): passed through untouched."""
    return type(e).__module__.split(".")[0] in ("typer", "click")


def _users_problem(e: BaseException) -> str | None:
    """The message for an OS error the user can fix (full disk, quota, read-only, permissions;
    pipeline/io.py USER_ERRNOS), found in `e` or the exceptions it came from; else None."""
    from pipeline.io import USER_ERRNOS, describe_os_error

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:
            return describe_os_error(e)
        e = e.__cause__ or e.__context__
    return None


def handle_errors(fn):
    """Turn CleanError into one red line on stderr and exit code 2 (no traceback).

    An OS error the user can fix (a full disk, a read-only folder: pipeline/io.py USER_ERRNOS) is
    one such line too, naming the path, the free space and the fix (exit code 2).
    Any other exception is a bug in `clean`, not bad input: it is shown as one line
    (`internal error: <type>: <message>`) with exit code 1; set CLEAN_DEBUG=1 to get the
    traceback (the exception is re-raised).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.markup import escape

        from pipeline.errors import CleanError

        try:
            return fn(*args, **kwargs)
        except CleanError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: previous outputs are left as they were")
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - last resort: no raw traceback for users
            mine = _users_problem(e)
            if mine is not None:  # their disk or their permissions, not a bug: name the path and the fix
                err_console.print(f"[bold red]error:[/] {escape(mine)}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if _is_cli_control(e) or os.environ.get("CLEAN_DEBUG", "") not in ("", "0"):
                raise
            msg = " ".join(str(e).split()) or "(no message)"
            err_console.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(msg[:500])} "
                              "(set CLEAN_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
