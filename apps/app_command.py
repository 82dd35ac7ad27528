"""`wb app`: serve the browser app (Streamlit) on localhost. The `wb` root mounts it.

Streamlit runs as a child process; SIGTERM and SIGINT sent to `wb app` are passed on to it and `wb app` waits
for it to end, so stopping `wb app` (a service manager, `kill`, Ctrl-C) frees the port. A second signal
kills a child that has not stopped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import typer

from apps.run_root import DEFAULT_RUNS_DIR, RUNS_DIR_ENV
from workbench.console import MODEL_OPTION, console

FORWARDED = (signal.SIGTERM, signal.SIGINT)


def run_until_stopped(argv: list[str], env: dict[str, str]) -> int:
    """Run `argv`, passing SIGTERM / SIGINT on to it; its exit code, or 0 when a signal stopped it."""
    process = subprocess.Popen(argv, env=env)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if received and process.poll() is None:
            process.kill()
        else:
            process.send_signal(signum)
        received.append(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if received else code


def serve(
    port: int = typer.Option(8501, "--port", help="Port to serve on (localhost)."),
    model: str = MODEL_OPTION,
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", envvar=RUNS_DIR_ENV,
                                 help="The run root: runs are listed from it, and the app writes only under it."),
    headless: bool = typer.Option(True, "--headless/--open-browser", help="Only print the URL, or also open a browser."),
) -> None:
    """The browser app (Streamlit): explore token categories, layers and runs, export configs."""
    script = importlib.util.find_spec("apps.workbench_app").origin
    runs_dir = os.path.abspath(os.path.expanduser(runs_dir))
    console.print(f"workbench app on [bold]http://localhost:{port}[/] (model {model}, run root {runs_dir}); "
                  f"Ctrl-C stops it")
    argv = [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port),
            "--server.address", "localhost", "--server.headless", str(headless).lower(),
            "--browser.gatherUsageStats", "false"]
    raise typer.Exit(run_until_stopped(argv, os.environ | {"WB_APP_MODEL": model, RUNS_DIR_ENV: runs_dir}))
