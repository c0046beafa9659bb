"""Rich output shared by every stage: one-line errors, progress bars, tables."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from stages.common.contract.redact import redact

# stdout carries results (tables, paths); stderr carries progress and diagnostics.
# emoji=False: specs like synth:train:64 must not render as "synth🚋64".
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if is_main_process():
        err.print(redact(message))


def warn(message: str) -> None:
    # one unwrapped line (a cluster log is grepped); the message is user text, never markup
    if is_main_process():
        err.print(f"[yellow]warning:[/] {escape(redact(message))}", soft_wrap=True)


def error_line(message: str, hint: str | None = None) -> None:
    # messages carry user text (paths, option values, "prism-vlm[eval]"): never interpret it as markup
    text = f"[bold red]error:[/] {escape(redact(message))}"
    if hint:
        text += f" [dim](hint: {escape(redact(hint))})[/]"
    err.print(text, soft_wrap=True)


# When stderr is not a terminal (a cluster job log), rich draws its bar only at the end; instead a plain
# line is printed at most every PLAIN_EVERY_S seconds (and at the end). PRISM_PROGRESS_EVERY overrides it.
PLAIN_EVERY_S = 30.0
HEARTBEAT = True  # print within a long step too (tests that drive a fake clock turn it off)
clock = time.monotonic  # tests replace it


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# The phase of a step now running ("rollout", "score", "update"; set by training.StepTimer), so a log line
# printed in the middle of a long step says where the step is.
_phase: list = [None, 0.0]


@contextmanager
def phase(name: str):
    _phase[:] = [name, clock()]
    try:
        yield
    finally:
        _phase[:] = [None, 0.0]


class PlainProgress:
    """Progress as plain text lines for logs: "sft 120/600 (20%) elapsed 0:10:00 eta 0:40:00 | loss 1.23".

    A heartbeat thread prints the line within a long step too (a paper-scale RL step is minutes), naming the
    phase the step is in: "rl (grpo) 0/2 (0%) elapsed 0:01:00 | in rollout for 0:00:45"."""

    def __init__(self, description: str, total: int | None, every_s: float):
        self.description, self.total, self.every_s = description, total, every_s
        self.done, self.status = 0, ""
        self.start = self.last = clock()
        self.printed: tuple | None = None  # (done, status) of the last line printed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="prism-progress", daemon=True)

    def line(self) -> str:
        elapsed = clock() - self.start
        text = f"{self.description} {self.done}"
        if self.total:
            text += f"/{self.total} ({100 * self.done / self.total:.0f}%)"
        text += f" elapsed {_duration(elapsed)}"
        if self.total and self.done:
            text += f" eta {_duration(elapsed * (self.total - self.done) / self.done)}"
        name, since = _phase
        return (text + (f" | {self.status}" if self.status else "")
                + (f" | in {name} for {_duration(clock() - since)}" if name else ""))

    def tick(self, force: bool = False) -> None:
        with self._lock:
            now = clock()
            if force or now - self.last >= self.every_s:
                self.last = now
                self.printed = (self.done, self.status)
                err.print(escape(redact(self.line())), soft_wrap=True, highlight=False)
                err.file.flush()

    def finish(self) -> None:
        """The closing line, unless the last line printed already said the same."""
        self._stop.set()
        if self.printed != (self.done, self.status):
            self.tick(force=True)

    def _heartbeat(self) -> None:
        poll = max(0.05, min(self.every_s / 4, 5.0))
        while not self._stop.wait(poll):
            self.tick()

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        self.tick()

    def update(self, status: str) -> None:
        self.status = status
        self.tick()


@contextmanager
def progress(description: str, total: int | None, enabled: bool = True):
    """A rich progress bar; yields an object with .advance(n=1) and .update(**fields)."""
    show = enabled and is_main_process() and not os.environ.get("PRISM_NO_PROGRESS")
    if show and not err.is_terminal:
        plain = PlainProgress(redact(description), total, float(os.environ.get("PRISM_PROGRESS_EVERY") or PLAIN_EVERY_S))
        plain.tick(force=True)
        if HEARTBEAT:
            plain._beat.start()
        try:
            yield plain
        finally:
            plain.finish()
        return
    bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}"), console=err, disable=not show,
                   transient=False)
    with bar:
        task = bar.add_task(redact(description), total=total, status="")

        class _Handle:
            def advance(self, n: int = 1, status: str | None = None) -> None:
                bar.advance(task, n)
                if status is not None:
                    bar.update(task, status=status)

            def update(self, status: str) -> None:
                bar.update(task, status=status)

        yield _Handle()


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    # Cells and title are plain text (paths, specs, config values), never markup.
    t = Table(title=Text(title), title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[Text("" if v is None else (f"{v:.4g}" if isinstance(v, float) else redact(str(v)))) for v in r])
    return t


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    if is_main_process():
        out.print(table(title, columns, rows))


def flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
