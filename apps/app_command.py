"""`wb app`: serve the browser app (Streamlit) on localhost. The `wb` root mounts it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import typer

from workbench.console import MODEL_OPTION, console


def serve(
    port: int = typer.Option(8501, "--port", help="Port to serve on (localhost)."),
    model: str = MODEL_OPTION,
    headless: bool = typer.Option(True, "--headless/--open-browser", help="Only print the URL, or also open a browser."),
) -> None:
    """The browser app (Streamlit): explore token categories, layers and runs, export configs."""
    script = importlib.util.find_spec("apps.workbench_app").origin
    console.print(f"workbench app on [bold]http://localhost:{port}[/] (model {model}); Ctrl-C stops it")
    argv = [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port),
            "--server.address", "localhost", "--server.headless", str(headless).lower(),
            "--browser.gatherUsageStats", "false"]
    try:
        code = subprocess.call(argv, env=os.environ | {"WB_APP_MODEL": model})
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)
