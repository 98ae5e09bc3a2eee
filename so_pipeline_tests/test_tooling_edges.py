"""The local tooling's edges: a shared runtime folder, passwords on the command line, and
`so-pipeline dev` stopped after being started in the background as a script would."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from so_pipeline.tooling.embedded import UnsafeFolderError, check_private_folder
from so_pipeline_tests.helpers import BIN


def test_a_private_runtime_folder_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "runtime"
    folder.mkdir(mode=0o700)

    check_private_folder(folder)


def test_a_runtime_folder_writable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "runtime"
    folder.mkdir()
    folder.chmod(0o777)

    with pytest.raises(UnsafeFolderError, match="writable by other users"):
        check_private_folder(folder)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_runtime_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "runtime"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)  # nobody

    with pytest.raises(UnsafeFolderError, match="belongs to user id 65534"):
        check_private_folder(folder)


def test_a_runtime_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "runtime").symlink_to(target)

    with pytest.raises(UnsafeFolderError, match="not a folder"):
        check_private_folder(tmp_path / "runtime")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_load_dump_warns_about_a_password_on_the_command_line(tmp_path: Path) -> None:
    pytest.importorskip("lxml", reason="load-dump's XML parser needs the 'local' extra")
    secret = "pw-cmdline-7c1d"
    url = f"postgresql://loader:{secret}@127.0.0.1:{_free_port()}/so?connect_timeout=2"
    dump = tmp_path / "Posts.xml"
    dump.write_text("<posts></posts>")
    env = {k: v for k, v in os.environ.items() if k != "SO_SOURCE_DATABASE_URL"}

    result = subprocess.run(
        [str(BIN / "so-pipeline"), "load-dump", str(dump), "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )

    assert "visible to every local user" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert result.returncode != 0


def _processes_with(marker: str) -> list[str]:
    """Processes whose command line or environment holds `marker` (e.g. DAGSTER_HOME's path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environment = (entry / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command and (marker in command or marker in environment):
                found.append(f"{entry.name}: {command}")
    return found


@pytest.mark.integration
def test_dev_started_in_the_background_stops_with_everything_it_started(tmp_path: Path) -> None:
    """A non-interactive shell's `&` leaves SIGINT ignored in the child, as systemd or a script
    would start it; a SIGTERM must still stop the UI, the daemon, the code servers and
    PostgreSQL."""
    home = tmp_path / "dev_home"
    port = _free_port()
    log = tmp_path / "dev.log"
    started = subprocess.run(
        [
            "bash",
            "-c",
            f"'{BIN / 'so-pipeline'}' --home '{home}' dev --port {port} > '{log}' 2>&1 & echo $!",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wrapper = int(started.stdout.strip())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the UI never came up:\n{log.read_text()[-3000:]}")
        ignored = int(
            Path(f"/proc/{wrapper}/status").read_text().split("SigIgn:")[1].split()[0], 16
        )
        assert ignored & (1 << (signal.SIGINT - 1)), "the wrapper should inherit SIGINT ignored"
        assert len(_processes_with(str(home))) >= 2  # the wrapper's children and PostgreSQL

        os.kill(wrapper, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _processes_with(str(home)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_with(str(home))
    finally:
        for line in _processes_with(str(home)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)

    assert not left, left
