"""CPU seconds of every process on a copy's path, by role, measured while the copy runs.

The server's side is exact in total: a backend's CPU time reaches its postmaster's
children-times counter (cutime + cstime in /proc/<pid>/stat) when the postmaster reaps it, so
that counter's growth plus the live children's own growth is every second the server spent.
Which database a backend served comes from its process title ("postgres: user database
host(port) ..."), sampled every SAMPLE_SECONDS: a backend's last fraction of a sample is not
seen by role, and is reported as such, never dropped. Client processes (a run's Python
process, psql, the Dagster daemon) are sampled the same way under a root pid.
"""

import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SAMPLE_SECONDS = 0.1
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
NOT_SAMPLED = "server, not seen by role (backends' last moments)"
SERVER_BACKGROUND = "server background (WAL writer, checkpointer, ...)"
HOG_ROLE = "CPU hog"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def own_cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def reaped_children_cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[13]) + int(fields[14])) / _TICKS_PER_SECOND


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a thread that forks is the child's parent)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, pending = [], children(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending += children(child)
    return found


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def backend_database(title: str) -> str | None:
    """The database of a backend's title "postgres: user database host(port) activity"."""
    words = title.removeprefix("postgres: ").split()
    return words[1] if len(words) >= 3 and "(" in words[2] else None


@dataclass
class CpuUse:
    """CPU seconds by role (the server's roles add up to its exact total)."""

    by_role: dict[str, float]

    def per_million(self, rows: int) -> dict[str, float]:
        return {role: seconds * 1_000_000 / rows for role, seconds in self.by_role.items()}


@dataclass
class _Tracked:
    role: str
    on_server: bool
    first: float
    last: float


@dataclass
class CpuMeter:
    """Samples CPU use while inside: the server under `postmaster_pid` (backends by the role
    `database_roles` gives their database) and the process trees given to `watch`."""

    postmaster_pid: int
    database_roles: dict[str, str]
    _roots: dict[int, Callable[[int], str]] = field(default_factory=dict)
    _backend_roles: dict[int, str] = field(default_factory=dict)
    _tracked: dict[int, _Tracked] = field(default_factory=dict)
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, root_pid: int, role: str | Callable[[int], str]) -> None:
        """Account for `root_pid` and the processes under it from now on, each under `role`
        (or the role that `role(pid)` names)."""
        with self._lock:
            self._roots[root_pid] = role if callable(role) else lambda pid: role

    def label_backend(self, pid: int, role: str) -> None:
        """Account for the backend `pid` under `role` instead of its database's."""
        with self._lock:
            self._backend_roles[pid] = role

    def __enter__(self) -> "CpuMeter":
        self._reaped_at_start = reaped_children_cpu_seconds(self.postmaster_pid)
        self._sample(born_before=True)
        self._sampler = threading.Thread(target=self._run, daemon=True)
        self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._sampler.join()
        self._sample()

    def result(self) -> CpuUse:
        by_role: dict[str, float] = defaultdict(float)
        for tracked in self._tracked.values():
            by_role[tracked.role] += tracked.last - tracked.first
        server = [t for t in self._tracked.values() if t.on_server]
        alive = set(children(self.postmaster_pid))
        # Exact: every exited backend's whole use reached the postmaster when it was reaped;
        # the live processes' use is their growth while watched.
        reaped = reaped_children_cpu_seconds(self.postmaster_pid) - self._reaped_at_start
        server_total = reaped + sum(
            t.last - t.first for pid, t in self._tracked.items() if t.on_server and pid in alive
        )
        by_role[NOT_SAMPLED] = server_total - sum(t.last - t.first for t in server)
        return CpuUse(dict(by_role))

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self, born_before: bool = False) -> None:
        """Read every watched process's CPU seconds; a process first seen now started at 0
        (unless it was already running when the meter started)."""
        with self._lock:
            roots, backend_roles = dict(self._roots), dict(self._backend_roles)
        seen: list[tuple[int, str, bool]] = []
        for pid in children(self.postmaster_pid):
            database = backend_database(process_title(pid))
            if pid in backend_roles:
                seen.append((pid, backend_roles[pid], True))
            elif database is None:
                seen.append((pid, SERVER_BACKGROUND, True))
            else:
                role = self.database_roles.get(database, "server, other databases")
                seen.append((pid, role, True))
        for root, role_of in roots.items():
            seen += [(pid, role_of(pid), False) for pid in [root, *descendants(root)]]
        for pid, role, on_server in seen:
            seconds = own_cpu_seconds(pid)
            if seconds is None:
                continue
            tracked = self._tracked.get(pid)
            if tracked is None:
                first = seconds if born_before else 0.0
                self._tracked[pid] = _Tracked(role, on_server, first, seconds)
            else:
                tracked.role, tracked.last = role, seconds


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def cpu_table(uses: list[tuple[str, CpuUse, int]]) -> str:
    """CPU seconds per 1M rows of each role, one column per (label, use, rows) given."""
    roles = sorted({role for _, use, _ in uses for role in use.by_role}, key=_role_order)
    width = max(len(role) for role in roles) + 2
    header = "".join(f"{label:>16}" for label, _, _ in uses)
    lines = [f"{'CPU seconds per 1M posts':<{width}}{header}"]
    for role in roles:
        cells = "".join(f"{use.per_million(rows).get(role, 0.0):>16.2f}" for _, use, rows in uses)
        lines.append(f"{role:<{width}}{cells}")
    totals = "".join(
        f"{sum(v for r, v in use.per_million(rows).items() if r != HOG_ROLE):>16.2f}"
        for _, use, rows in uses
    )
    lines.append(f"{'all of the copy (without the hog)':<{width}}{totals}")
    return "\n".join(lines)


def _role_order(role: str) -> tuple[int, str]:
    return (1 if role.startswith("server") or role == HOG_ROLE else 0, role)


@contextmanager
def cpu_hog(meter: CpuMeter | None = None) -> Iterator[subprocess.Popen]:
    """A second CPU-bound process on the machine while inside (a busy server is the normal
    case): a Python loop that never sleeps, at the same priority as everything else."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if meter is not None:
        meter.watch(hog.pid, HOG_ROLE)
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()
