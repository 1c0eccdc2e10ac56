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
import os
import subprocess
import sys
import time
from pathlib import Path

from cpu_share import CGROUP_CPU, check_available
from cpu_share import DEFAULT_PERIOD_US as DEFAULT_PERIOD_US
from cpu_share import CgroupUnavailable as CgroupUnavailable
from cpu_share import CpuShare as VcpuShare

ONE_VCPU_MB = 1769  # AWS: one vCPU-second of credits per second at 1,769 MB
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 10_240
# (largest memory size in MB, vCPUs visible up to it): measured on Lambda, see the module docstring.
VISIBLE_VCPUS: tuple[tuple[int, int], ...] = ((3008, 2), (5307, 3), (7076, 4), (8845, 5), (10_240, 6))
CGROUP_CPU_ROOT = CGROUP_CPU


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
    check_available(root)


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


class CpuShare(VcpuShare):
    """The CPU cgroup (``cpu_share.CpuShare``) of a Lambda function of ``memory_mb``: its vCPU share over the
    vCPUs such a function sees; ``name`` names the group (one left by a killed run is reported, not reused)."""

    def __init__(self, memory_mb: int, *, period_us: int = DEFAULT_PERIOD_US, name: str | None = None,
                 root: Path = CGROUP_CPU_ROOT) -> None:
        self.memory_mb = memory_mb
        self.share = vcpu_share(memory_mb)
        super().__init__(self.share, cpus=visible_vcpus(memory_mb), period_us=period_us, root=root)
        if name is not None:
            self.path = root / name

    def __enter__(self) -> CpuShare:
        if self.path.exists():
            raise CgroupUnavailable(f"{self.path} exists (left over by a killed run?): rmdir it")
        super().__enter__()
        return self

    def stats(self) -> dict[str, int]:
        """``cpu.stat``: nr_periods, nr_throttled, throttled_time (ns), ..."""
        return self.throttled()

    def __repr__(self) -> str:
        return (f"CpuShare({self.memory_mb} MB: {self.share:.2f} vCPU over {len(self.cores)} visible, "
                f"quota {self.quota_us}/{self.period_us} us)")


# -- self-check ------------------------------------------------------------------------------------------
SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass\n"


def measure_share(memory_mb: int, seconds: float = 1.0, period_us: int = DEFAULT_PERIOD_US) -> float:
    """Spin as many processes as the visible vCPUs inside the share; their CPU seconds per wall second."""
    with CpuShare(memory_mb, period_us=period_us) as share:
        start = time.perf_counter()
        procs = []
        for _ in range(len(share.cores)):
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
