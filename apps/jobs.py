"""Batch analyses started from the app as background processes (`wb analyze ...`), with their progress
read from the log their tqdm bars write, so a long run never blocks the page.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ANALYSES = ("tokens", "similarity", "alignment", "probe", "interventions")
_PERCENT = re.compile(r"(\d{1,3})%\|")


def analyze_command(kind: str, model: str, images: str, out: str) -> list[str]:
    """The `wb analyze` command line, run with this interpreter (works without `wb` on PATH)."""
    if kind not in ANALYSES:
        raise ValueError(f"unknown analysis {kind!r}; choose one of {', '.join(ANALYSES)}")
    return [sys.executable, "-m", "wb", "analyze", kind,
            "--model", model, "--images", images, "--out", out]


@dataclass
class Job:
    argv: list[str]
    log: Path
    out: str
    process: subprocess.Popen
    started: float = field(default_factory=time.time)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_job(argv: list[str], log: str | Path, out: str) -> Job:
    """Start `argv` in the background, stdout and stderr into `log`."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Job(argv=argv, log=log, out=out, process=process)


def progress_of(log_text: str) -> tuple[float | None, str]:
    """(fraction done of the latest progress bar, or None; the last non-empty line) of a job's log."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_text) if line.strip()]
    last = lines[-1] if lines else ""
    for line in reversed(lines):
        match = _PERCENT.search(line)
        if match:
            return min(int(match.group(1)), 100) / 100, last
    return None, last
