"""Batch analyses started from the app as background processes (`wb analyze ...`), with their progress
read from the log their tqdm bars write, so a long run never blocks the page.

A job's log sits beside its run folder (`NAME.log`) and is only ever appended to: a second job of the same
name (a resume) adds to it, and reads its own part from where the log ended when it started.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ANALYSES = ("tokens", "similarity", "alignment", "probe", "interventions")
# A tqdm line: "DESCRIPTION:  42%|####  | 5/12 [...]" (the description may be empty).
_BAR = re.compile(r"^(?P<description>.*?):?\s*(?P<percent>\d{1,3})%\|")
# Bars that load weights before the analysis starts (transformers, gguf): not the analysis's progress,
# and at 100% long before the job is done.
_LOADING_BAR = re.compile(r"^(loading|converting and de-quantizing|fetching|downloading)", re.IGNORECASE)


def analyze_command(kind: str, model: str, images: str, out: str | Path) -> list[str]:
    """The `wb analyze` command line, run with this interpreter (works without `wb` on PATH). Values are
    joined to their options (`--images=...`), so a value that starts with `--` cannot pass as an option."""
    if kind not in ANALYSES:
        raise ValueError(f"unknown analysis {kind!r}; choose one of {', '.join(ANALYSES)}")
    return [sys.executable, "-m", "wb", "analyze", kind, f"--model={model}", f"--images={images}", f"--out={out}"]


def log_path(out: Path) -> Path:
    """The log beside a run folder: `NAME.log` (not `with_suffix`, which would cut a name like `tokens.v2`)."""
    return out.with_name(out.name + ".log")


@dataclass
class Job:
    argv: list[str]
    log: Path
    out: Path
    process: subprocess.Popen
    log_start: int = 0  # where this job's part of the log begins
    started: float = field(default_factory=time.time)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    def log_text(self) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")


def start_job(argv: list[str], log: Path, out: Path) -> Job:
    """Start `argv` in the background, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        start = handle.tell()
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Job(argv=argv, log=log, out=out, process=process, log_start=start)


def progress_of(log_text: str) -> tuple[float | None, str, str]:
    """(fraction done of the analysis's latest bar, or None; that bar's description; the last non-empty
    line) of a job's log. Weight-loading bars are skipped."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_text) if line.strip()]
    last = lines[-1] if lines else ""
    for line in reversed(lines):
        match = _BAR.search(line)
        if match and not _LOADING_BAR.match(match.group("description")):
            return min(int(match.group("percent")), 100) / 100, match.group("description"), last
    return None, "", last


@dataclass
class JobStatus:
    label: str  # "running: token evidence", "finished", "failed (exit 2)", ...
    fraction: float | None  # the bar to draw, or None for no bar
    last_line: str


def job_status(returncode: int | None, log_text: str) -> JobStatus:
    """What a job's card shows: its own bar while it runs, a full bar when it finished, no bar when it failed."""
    fraction, description, last = progress_of(log_text)
    if returncode is None:
        if fraction is None:
            return JobStatus("starting (loading the model)", None, last)
        return JobStatus(f"running: {description or 'analysis'}", fraction, last)
    if returncode == 0:
        return JobStatus("finished", 1.0, last)
    return JobStatus(f"failed (exit {returncode})", None, last)
