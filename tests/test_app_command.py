"""`wb app` stops its Streamlit child when it is stopped: `wb app` in a subprocess on a free port, a signal to
it alone (as a service manager or `kill` sends it), and the child is gone and the port free within seconds."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = 60  # s until Streamlit answers (the app script itself only runs when a browser connects)
STOP_TIMEOUT = 15  # s for `wb app` to pass the signal on and see its child end


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would: TIME_WAIT is no listener
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_stopping_wb_app_stops_streamlit_and_frees_the_port(tmp_path, signum):
    port = _free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    wb = subprocess.Popen([sys.executable, "-m", "wb", "app", "--port", str(port), "--runs-dir", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.time() + START_TIMEOUT
        while not _healthy(port):
            assert wb.poll() is None and time.time() < deadline, "wb app did not start serving"
            time.sleep(0.2)
        children = _children(wb.pid)
        assert children, "Streamlit runs as a child of wb app"
        wb.send_signal(signum)  # to wb app alone, not its process group
        assert wb.wait(timeout=STOP_TIMEOUT) == 0
        assert not [pid for pid in children if _alive(pid)], "the Streamlit child outlived wb app"
        assert _port_is_free(port) and not _healthy(port)
    finally:
        for pid in [*children, wb.pid]:  # only what this test started, if it failed half-way
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        wb.wait(timeout=STOP_TIMEOUT)
