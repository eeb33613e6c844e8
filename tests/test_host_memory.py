"""Host memory as the process may use it: MemAvailable, bounded by the cgroup's limit."""
from pathlib import Path

from djinn import host_memory


def _meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 999999999 kB\nMemAvailable: {available_kb} kB\n")
    return path


def test_cgroup_v2_limit_binds_below_mem_available(tmp_path):
    root = tmp_path / "cg"
    group = root / "box"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(str(3 << 30))
    (group / "memory.current").write_text(str(1 << 30))
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box\n")
    mem = host_memory.read(root, _meminfo(tmp_path, 20 << 20), proc)
    assert mem.available_bytes == 2 << 30
    assert "cgroup limit 3.00 GiB" in mem.describe()


def test_cgroup_v1_parent_limit_binds(tmp_path):
    root = tmp_path / "cg"
    parent = root / "memory" / "outer"
    child = parent / "inner"
    child.mkdir(parents=True)
    (child / "memory.limit_in_bytes").write_text(str(9223372036854771712))  # v1's "no limit"
    (child / "memory.usage_in_bytes").write_text(str(1 << 30))
    (parent / "memory.limit_in_bytes").write_text(str(4 << 30))
    (parent / "memory.usage_in_bytes").write_text(str(1 << 30))
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/outer/inner\n0::/\n")
    assert host_memory.read(root, _meminfo(tmp_path, 20 << 20), proc).available_bytes == 3 << 30


def test_no_limit_is_mem_available(tmp_path):
    root = tmp_path / "cg"
    (root / "box").mkdir(parents=True)
    (root / "box" / "memory.max").write_text("max\n")
    (root / "box" / "memory.current").write_text("5\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box\n")
    mem = host_memory.read(root, _meminfo(tmp_path, 1024), proc)
    assert mem.cgroup_limit_bytes is None and mem.available_bytes == 1024 * 1024


def test_this_machine_reads():
    mem = host_memory.read()
    assert 0 < mem.available_bytes <= mem.mem_available_bytes
