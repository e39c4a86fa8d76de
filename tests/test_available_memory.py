"""The memory the CPU fast paths size their packed weight copies by: MemAvailable, or a container's
cgroup limit where that leaves less."""

from __future__ import annotations

from pathlib import Path

from octavo.layers.cpu_extension import available_memory_bytes

GIB = 1 << 30


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _meminfo(tmp_path: Path, available_gib: int) -> str:
    return _write(tmp_path / "meminfo", f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {available_gib * GIB // 1024} kB\n")


def test_meminfo_alone_without_a_cgroup_limit(tmp_path):
    own = _write(tmp_path / "self-cgroup", "0::/job\n")
    _write(tmp_path / "cg" / "job" / "memory.max", "max\n")
    assert available_memory_bytes(_meminfo(tmp_path, 20), str(tmp_path / "cg"), own) == 20 * GIB
    assert available_memory_bytes(str(tmp_path / "missing"), str(tmp_path / "cg"), own) is None


def test_a_cgroup_v2_limit_counts_inactive_page_cache_as_free(tmp_path):
    own = _write(tmp_path / "self-cgroup", "0::/job\n")
    folder = tmp_path / "cg" / "job"
    _write(folder / "memory.max", f"{8 * GIB}\n")
    _write(folder / "memory.current", f"{6 * GIB}\n")
    _write(folder / "memory.stat", f"anon {3 * GIB}\ninactive_file {2 * GIB}\n")
    assert available_memory_bytes(_meminfo(tmp_path, 20), str(tmp_path / "cg"), own) == 4 * GIB
    # a generous limit leaves MemAvailable in charge
    _write(folder / "memory.max", f"{64 * GIB}\n")
    assert available_memory_bytes(_meminfo(tmp_path, 20), str(tmp_path / "cg"), own) == 20 * GIB


def test_a_cgroup_v1_limit_inside_a_namespace(tmp_path):
    """v1's memory controller; the process's own cgroup is the mount's root (no folder for its path)."""
    own = _write(tmp_path / "self-cgroup", "4:memory:/outer/job\n3:cpu:/\n0::/\n")
    base = tmp_path / "cg" / "memory"
    _write(base / "memory.limit_in_bytes", f"{10 * GIB}\n")
    _write(base / "memory.usage_in_bytes", f"{9 * GIB}\n")
    _write(base / "memory.stat", f"inactive_file {GIB}\ntotal_inactive_file {3 * GIB}\n")
    assert available_memory_bytes(_meminfo(tmp_path, 20), str(tmp_path / "cg"), own) == 4 * GIB
    _write(base / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert available_memory_bytes(_meminfo(tmp_path, 20), str(tmp_path / "cg"), own) == 20 * GIB
