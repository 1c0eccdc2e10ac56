"""Run processes under a CPU share, as Lambda runs a function: N vCPU-seconds per second, on the cores it sees.

Lambda gives a function CPU in proportion to its memory (one vCPU's worth at 1,769 MB, so ~1.16 at 2,048 MB)
while showing it 2 vCPUs up to 3,008 MB. Emulated here with the cgroup v1 ``cpu`` controller (root, mounted
writable at /sys/fs/cgroup/cpu): a group whose ``cpu.cfs_quota_us`` is share x ``cpu.cfs_period_us`` lets its
threads run, summed over all cores, that long in every period, then stops them until the next one. The
process's (and its threads') CPU affinity is set to the cores the function would see.

The period: the kernel's default is 100 ms; Lambda has been observed to throttle in 20 ms periods (a
function that overruns its share of a 20 ms slice pauses until the slice ends), which matters for requests
of tens of milliseconds, so 20 ms is the default here.

    from cpu_share import CpuShare, run

    run(["python", "-c", "..."], vcpus=1.15)          # a command under 1.15 vCPU on 2 cores
    with CpuShare(1.0) as share:                       # or any processes, for as long as the block lasts
        proc = subprocess.Popen(...)
        share.add(proc.pid)

    python bench/cpu_share.py 1.0 1.15 2               # self-check: spin 2 threads under each share

Without root or the controller, :class:`CgroupUnavailable` says what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
DEFAULT_PERIOD_US = 20_000
LAMBDA_VISIBLE_CPUS = 2  # what a function of 128-3,008 MB sees (os.sched_getaffinity, /proc/cpuinfo)


class CgroupUnavailable(RuntimeError):
    """The cgroup v1 cpu controller cannot be used here; the message says why."""


def check_available(root: Path = CGROUP_CPU) -> None:
    """Raise :class:`CgroupUnavailable` unless a CPU cgroup can be created under ``root``."""
    need = f"CPU shares need root and the cgroup v1 cpu controller mounted writable at {root}"
    if not (root / "cpu.cfs_quota_us").exists():
        raise CgroupUnavailable(f"{need}: {root}/cpu.cfs_quota_us does not exist (cgroup v2 only, or not mounted)")
    if os.geteuid() != 0 or not os.access(root, os.W_OK):
        raise CgroupUnavailable(f"{need}: {root} is not writable by uid {os.geteuid()}")


class CpuShare:
    """A CPU cgroup of ``vcpus`` vCPU-seconds per second over ``cpus`` cores; a context manager.

    Leaving the block moves every process still in the group back to the root group and removes it.
    """

    def __init__(self, vcpus: float, *, cpus: int = LAMBDA_VISIBLE_CPUS, period_us: int = DEFAULT_PERIOD_US,
                 root: Path = CGROUP_CPU) -> None:
        cores = sorted(os.sched_getaffinity(0))
        if not 0 < vcpus <= min(cpus, len(cores)):
            raise ValueError(f"a share of {vcpus} vCPU does not fit {cpus} core(s) (this machine: {len(cores)})")
        if not 1_000 <= period_us <= 1_000_000 or vcpus * period_us < 1_000:
            raise ValueError(f"period {period_us} us with {vcpus} vCPU: the kernel takes periods of 1 ms-1 s "
                             "and quotas of at least 1 ms")
        self.vcpus, self.period_us = vcpus, period_us
        self.quota_us = round(vcpus * period_us)
        self.cores = set(cores[:cpus])
        self.root = root
        self.path = root / f"clip-cpu-share-{os.getpid()}-{id(self):x}"

    def __enter__(self) -> CpuShare:
        check_available(self.root)
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        burst = self.path / "cpu.cfs_burst_us"
        if burst.exists():
            burst.write_text("0")  # no unused quota carried over from one period to the next
        return self

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads; those it starts later are born inside) into the share."""
        (self.path / "cgroup.procs").write_text(str(pid))
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(tid), self.cores)

    def throttled(self) -> dict[str, int]:
        """``cpu.stat``: ``nr_periods``, ``nr_throttled``, ``throttled_time`` (ns)."""
        pairs = (line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return {key: int(value) for key, value in pairs}

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for _ in range(50):  # an exiting process may linger a moment
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it ended meanwhile
                    (self.root / "cgroup.procs").write_text(pid)
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def __repr__(self) -> str:
        return f"CpuShare({self.vcpus:g} vCPU on {len(self.cores)} cores, {self.quota_us}/{self.period_us} us)"


def run(cmd: Sequence[str], vcpus: float | None, *, period_us: int = DEFAULT_PERIOD_US,
        **popen: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(cmd, **popen)`` with the process under ``vcpus`` (None: unrestricted)."""
    if vcpus is None:
        return subprocess.run(cmd, check=False, **popen)
    capture = popen.pop("capture_output", False)
    if capture:
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
    with CpuShare(vcpus, period_us=period_us) as share:
        # The child waits for a line on stdin until it is inside: nothing it does runs unrestricted.
        gate = ["-c", "import os, sys; sys.stdin.readline(); os.execvp(sys.argv[1], sys.argv[1:])", *cmd]
        with subprocess.Popen([sys.executable, *gate], stdin=subprocess.PIPE, **popen) as proc:
            share.add(proc.pid)
            out, err = proc.communicate(b"go\n" if not popen.get("text") else "go\n")
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Self-check: spin one process per core under each share and "
                                     "compare the CPU seconds per second it got with the share.")
    parser.add_argument("vcpus", nargs="*", type=float, default=[1.0, 1.15, 2.0])
    parser.add_argument("--period-us", type=int, default=DEFAULT_PERIOD_US)
    args = parser.parse_args()
    try:
        check_available()
    except CgroupUnavailable as exc:
        raise SystemExit(str(exc)) from None
    print("| share (vCPU) | measured (CPU s per s, 2 spinning processes) |\n|---|---|")
    for vcpus in args.vcpus:
        with CpuShare(vcpus, period_us=args.period_us) as share:
            start = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=1.0)]) for _ in share.cores]
            for proc in procs:
                share.add(proc.pid)
            used = sum(os.wait4(proc.pid, 0)[2].ru_utime for proc in procs)
            print(f"| {vcpus:g} | {used / (time.perf_counter() - start):.2f} |")


if __name__ == "__main__":
    main()
