"""Lambda's CPU share of a memory size, emulated on Linux with the cgroup v1 CPU controller.

What Lambda gives a function (AWS Lambda Developer Guide, "Configure Lambda function memory"): CPU in
proportion to the configured memory, "at 1,769 MB, a function has the equivalent of one vCPU (one
vCPU-second of credits per second)", up to 6 vCPUs at 10,240 MB. How many vCPUs the function *sees*
(``os.sched_getaffinity``, ``/proc/cpuinfo``) AWS does not document; measured on Lambda
(github.com/rwnx/lambda-cpuinfo): 2 from 128 to 3,008 MB, 3 to 5,307, 4 to 7,076, 5 to 8,845, 6 above.
So a 1,024 MB function runs ONNX Runtime's two intra-op threads (``CLIP_NUM_THREADS`` defaults to the
visible vCPUs) on 0.58 of one vCPU, and a 3,008 MB one on 1.70.

How it is emulated here (root, the cgroup v1 ``cpu`` controller mounted writable at /sys/fs/cgroup/cpu):

- ``mkdir /sys/fs/cgroup/cpu/<name>``; ``cpu.cfs_period_us`` = the period P, ``cpu.cfs_quota_us`` =
  share x P: CFS bandwidth control lets the group's threads run, summed over all CPUs, for at most
  share x P microseconds in every period of P, then stops them until the next period;
- the function's process id goes into ``cgroup.procs`` (all its threads move; threads and children it
  creates later are born there);
- its threads' CPU affinity is set to as many of this machine's cores as Lambda shows vCPUs, so the
  function's own thread count (ORT's intra-op threads) is what it would be on Lambda.

The period: the kernel's default is 100 ms. Observed on Lambda, throttling works in periods of 20 ms
(github.com/pwrdrvr/lambda-dispatch issue 246: a function that uses more than its share of a 20 ms slice
pauses until the slice ends). The period matters for requests of tens of milliseconds: with 100 ms a
60 ms request at 0.58 vCPU often finishes on one period's budget, unthrottled; with 20 ms it is throttled
two or three times. The default here is 20 ms (``DEFAULT_PERIOD_US``); pass 100 ms to compare.

Not emulated: the host's own CPU model and clock (Lambda x86_64 runs on various Intel and AMD
generations), noisy neighbours on Lambda, and memory limits (see bench_memory.py for resident sizes).
This machine must have at least as many cores as Lambda shows vCPUs, and the share must fit its cores:
2 cores emulate every size up to 3,008 MB.

    python bench/lambda_cpu.py --check 1024 1769 3008   # spin 2 threads under each share, compare
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ONE_VCPU_MB = 1769  # AWS: one vCPU-second of credits per second at 1,769 MB
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 10_240
# (largest memory size in MB, vCPUs visible up to it): measured on Lambda, see the module docstring.
VISIBLE_VCPUS: tuple[tuple[int, int], ...] = ((3008, 2), (5307, 3), (7076, 4), (8845, 5), (10_240, 6))
DEFAULT_PERIOD_US = 20_000
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")


class CgroupUnavailable(RuntimeError):
    """The cgroup v1 CPU controller cannot be used here (not mounted, not writable, not root)."""


def vcpu_share(memory_mb: int) -> float:
    """vCPU-seconds per second that Lambda gives ``memory_mb``: memory / 1,769 MB."""
    _check_memory(memory_mb)
    return memory_mb / ONE_VCPU_MB


def visible_vcpus(memory_mb: int) -> int:
    """vCPUs a function of ``memory_mb`` sees (its affinity), as measured on Lambda."""
    _check_memory(memory_mb)
    return next(count for limit, count in VISIBLE_VCPUS if memory_mb <= limit)


def _check_memory(memory_mb: int) -> None:
    if not MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB:
        raise ValueError(f"Lambda memory is {MIN_MEMORY_MB}-{MAX_MEMORY_MB} MB, got {memory_mb}")


def check_cgroup(root: Path = CGROUP_CPU_ROOT) -> None:
    """Raise :class:`CgroupUnavailable` with what is missing, unless a CPU cgroup can be made under ``root``."""
    hint = ("the CPU-share emulation needs root and the cgroup v1 cpu controller mounted writable at "
            f"{root} (cpu.cfs_period_us, cpu.cfs_quota_us); ")
    if not (root / "cpu.cfs_quota_us").exists():
        raise CgroupUnavailable(hint + f"{root}/cpu.cfs_quota_us does not exist (cgroup v2 only, or no cpu "
                                "controller: not supported by this script)")
    if not os.access(root, os.W_OK):
        raise CgroupUnavailable(hint + f"{root} is not writable by uid {os.getuid()}")


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


class CpuShare:
    """A CPU cgroup with Lambda's share of ``memory_mb``; :meth:`add` puts a process (and its threads) in it.

    A context manager: leaving it moves any process still inside back to the parent group and removes
    the group.
    """

    def __init__(self, memory_mb: int, *, period_us: int = DEFAULT_PERIOD_US, name: str | None = None,
                 root: Path = CGROUP_CPU_ROOT) -> None:
        self.memory_mb = memory_mb
        self.share = vcpu_share(memory_mb)
        self.vcpus = visible_vcpus(memory_mb)
        self.period_us = period_us
        self.quota_us = round(self.share * period_us)
        if not 1_000 <= period_us <= 1_000_000:
            raise ValueError(f"cfs_period_us must be 1,000-1,000,000, got {period_us}")
        if self.quota_us < 1_000:
            raise ValueError(f"quota {self.quota_us} us is below the kernel's 1 ms minimum: use a longer period")
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < self.vcpus:
            raise ValueError(f"{memory_mb} MB shows {self.vcpus} vCPUs on Lambda; this process may use "
                             f"{len(cores)} core(s)")
        if self.share > len(cores):
            raise ValueError(f"{memory_mb} MB is {self.share:.2f} vCPUs; this machine has {len(cores)} core(s)")
        self.cpus = set(cores[: self.vcpus])
        self.root = root
        self.path = root / (name or f"clip-bench-{os.getpid()}-{memory_mb}mb")
        self._created = False

    def __enter__(self) -> CpuShare:
        check_cgroup(self.root)
        try:
            self.path.mkdir()
        except FileExistsError:
            raise CgroupUnavailable(f"{self.path} exists (left over by a killed run?): rmdir it") from None
        self._created = True
        # The kernel rejects a period shorter than the quota already set; -1 (no limit) is the default.
        (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        burst = self.path / "cpu.cfs_burst_us"
        if burst.exists():
            burst.write_text("0")  # no carry-over of unused quota between periods
        return self

    def add(self, pid: int) -> None:
        """Move process ``pid`` with all its threads into the group and pin each thread to the visible vCPUs."""
        if not self._created:
            raise RuntimeError("CpuShare.add outside its with-block")
        (self.path / "cgroup.procs").write_text(str(pid))
        for tid in thread_ids(pid):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(tid, self.cpus)

    def stats(self) -> dict[str, int]:
        """``cpu.stat``: nr_periods, nr_throttled, throttled_time (ns), ..."""
        out = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
        return out

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._created:
            return
        for _ in range(50):  # a process that is exiting may linger a moment
            pids = (self.path / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):  # ProcessLookupError: it ended meanwhile
                    (self.root / "cgroup.procs").write_text(pid)
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self._created = False

    def __repr__(self) -> str:
        return (f"CpuShare({self.memory_mb} MB: {self.share:.2f} vCPU over {self.vcpus} visible, "
                f"quota {self.quota_us}/{self.period_us} us)")


# -- self-check ------------------------------------------------------------------------------------------
SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass\n"


def measure_share(memory_mb: int, seconds: float = 1.0, period_us: int = DEFAULT_PERIOD_US) -> float:
    """Spin as many processes as the visible vCPUs inside the share; their CPU seconds per wall second."""
    with CpuShare(memory_mb, period_us=period_us) as share:
        start = time.perf_counter()
        procs = []
        for _ in range(share.vcpus):
            proc = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
            share.add(proc.pid)
            procs.append(proc)
        cpu = 0.0
        for proc in procs:
            _, _, usage = os.wait4(proc.pid, 0)
            cpu += usage.ru_utime + usage.ru_stime
        return cpu / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", nargs="+", type=int, metavar="MB", default=[1024, 1769, 3008],
                        help="memory sizes to spin under (CPU seconds per second should match the share)")
    parser.add_argument("--period-us", type=int, default=DEFAULT_PERIOD_US)
    args = parser.parse_args()
    try:
        check_cgroup()
    except CgroupUnavailable as exc:
        raise SystemExit(str(exc)) from None
    print("| memory | share (vCPU) | visible vCPUs | measured (CPU s per s, spinning) |\n|---|---|---|---|")
    for memory in args.check:
        measured = measure_share(memory, period_us=args.period_us)
        print(f"| {memory} MB | {vcpu_share(memory):.2f} | {visible_vcpus(memory)} | {measured:.2f} |")


if __name__ == "__main__":
    main()
