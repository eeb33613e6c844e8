"""How much host memory this process may still use: the kernel's estimate and the container's limit.

`MemAvailable` alone describes the whole machine; a process in a memory cgroup is
OOM-killed at the cgroup's limit long before that (a 3 GB cgroup on a 24 GB host). The
answer is the smaller of the two: MemAvailable, and the cgroup's limit less its usage
(v2 `memory.max`/`memory.current`, or v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`),
for the cgroup this process is in. Every default that sizes host memory (the CPU
"device" budget, the KV host swap, streamed models' host weights, receive limits)
reads it from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a page-rounded 2^63 - 1; anything this large is no limit.
NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class HostMemory:
    mem_available_bytes: int  # /proc/meminfo MemAvailable
    cgroup_limit_bytes: int | None  # None: no limit set
    cgroup_usage_bytes: int | None

    @property
    def available_bytes(self) -> int:
        """What this process can still allocate before either the kernel or its cgroup refuses."""
        if self.cgroup_limit_bytes is None or self.cgroup_usage_bytes is None:
            return self.mem_available_bytes
        return max(0, min(self.mem_available_bytes, self.cgroup_limit_bytes - self.cgroup_usage_bytes))

    def describe(self) -> str:
        limit = ("no cgroup limit" if self.cgroup_limit_bytes is None
                 else f"cgroup limit {self.cgroup_limit_bytes / 2**30:.2f} GiB, "
                      f"{(self.cgroup_usage_bytes or 0) / 2**30:.2f} GiB used")
        return (f"{self.available_bytes / 2**30:.2f} GiB available "
                f"(MemAvailable {self.mem_available_bytes / 2**30:.2f} GiB, {limit})")


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{meminfo} has no MemAvailable line")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= NO_LIMIT else value


def _own_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[str | None, str | None]:
    """This process's cgroup path under v2 (`0::/path`) and under v1's memory controller."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_limit(root: Path, proc_cgroup: Path) -> tuple[int | None, int | None]:
    """The tightest memory limit on the way from this process's cgroup to the root, and its usage."""
    v2, v1 = _own_cgroup(proc_cgroup)
    candidates = []
    if v2 is not None:
        candidates.append((root / v2.lstrip("/"), "memory.max", "memory.current"))
        candidates.append((root / "unified" / v2.lstrip("/"), "memory.max", "memory.current"))
    if v1 is not None:
        candidates.append((root / "memory" / v1.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
        # Inside a container the v1 path is often not mounted as named: its own mount is the root.
        candidates.append((root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"))
    best: tuple[int | None, int | None] = (None, None)
    for directory, limit_name, usage_name in candidates:
        # A parent's limit binds too: walk up to the mount point.
        here = directory
        while True:
            limit = _read_int(here / limit_name)
            usage = _read_int(here / usage_name)
            if limit is not None and usage is not None and (best[0] is None or limit - usage < best[0] - best[1]):
                best = (limit, usage)
            if here == root or here.parent == here or root not in here.parents:
                break
            here = here.parent
    return best


def read(root: Path = CGROUP_ROOT, meminfo: Path = Path("/proc/meminfo"),
         proc_cgroup: Path = Path("/proc/self/cgroup")) -> HostMemory:
    limit, usage = _cgroup_limit(root, proc_cgroup)
    return HostMemory(_mem_available(meminfo), limit, usage)


def available_bytes() -> int:
    return read().available_bytes
