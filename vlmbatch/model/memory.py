"""Whether a job fits in memory, checked before the memory is taken.

A process that outgrows the host is killed by the kernel without a word (a CPU run of the 3B model
in float32 needs ~12 GB; `--batch-size 100000` asked the small benchmark model for a 111 GB KV
cache), and on CUDA an oversized cache fails deep inside the first step. So the job adds up what it
is about to allocate and compares it with what the device has free, and a run that cannot fit stops
at once with the figures and what to change.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from vlmbatch.errors import VlmbatchError
from vlmbatch.model.config import TextConfig
from vlmbatch.model.gemma import KVCache

GB = 1 << 30
# Beside weights and cache, each engine process holds torch itself, the tokenizer and a step's
# activations: ~0.3 GB with the benchmark's small model, more for the step of a large one.
PROCESS_OVERHEAD = GB // 2
_CGROUP = Path("/sys/fs/cgroup")


def kv_cache_bytes(cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of `KVCache.allocate(cfg, slots, max_len, ...)`: keys and values of every layer."""
    return 2 * cfg.num_hidden_layers * math.prod(KVCache.shape(cfg, slots, max_len)) * dtype.itemsize


def available_bytes(device: torch.device) -> int | None:
    """What new allocations can take on `device` before they fail: on CUDA its free memory; on a CPU
    the kernel's MemAvailable plus free swap, within this process's cgroup limit. None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    meminfo = _read_meminfo()
    if "MemAvailable" not in meminfo:
        return None
    host = meminfo["MemAvailable"] + meminfo.get("SwapFree", 0)
    cgroup = _cgroup_available()
    return host if cgroup is None else min(host, cgroup)


def check_fits(device: torch.device, needs: dict[str, int], remedy: str) -> None:
    """Raise `not_enough` when `needs` (what → bytes) add up to more than `device` has free."""
    available = available_bytes(device)
    if available is not None and sum(needs.values()) > available:
        raise not_enough(device, needs, available, remedy)


def not_enough(device: torch.device, needs: dict[str, int], available: int, remedy: str) -> VlmbatchError:
    parts = " + ".join(f"{what} {total_gb(size)}" for what, size in needs.items())
    return VlmbatchError(f"not enough memory on {device}: {parts} = {total_gb(sum(needs.values()))} needed, "
                         f"{total_gb(available)} available; {remedy}")


def total_gb(size: int) -> str:
    return f"{size / GB:.1f} GB"


def _read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes ({} off Linux)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields = value.split()
        if fields and fields[0].isdigit():
            info[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return info


def _cgroup_available(root: Path = _CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), its inactive file pages counted as
    free (the kernel reclaims them first); None without a limit below the machine's memory."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for folder, (limit_file, usage_file, inactive_key) in _memory_cgroups(root, self_cgroup):
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is None or usage is None:
            continue
        if limit >= physical:
            return None
        return max(0, limit - usage + _read_stat(folder / "memory.stat").get(inactive_key, 0))
    return None


_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _memory_cgroups(root: Path, self_cgroup: Path) -> list[tuple[Path, tuple[str, str, str]]]:
    """Where this process's memory cgroup may be, with its file names: its own folder, then the root
    (inside a container the namespaced cgroup is the root)."""
    try:
        entries = [line.split(":", 2) for line in self_cgroup.read_text().splitlines()]
    except OSError:
        return []
    found = []
    for entry in entries:
        if len(entry) != 3:
            continue
        hierarchy, controllers, path = entry
        if hierarchy == "0" and not controllers:
            base, files = root, _V2_FILES
        elif "memory" in controllers.split(","):
            base, files = root / "memory", _V1_FILES
        else:
            continue
        found += [(base / path.lstrip("/"), files), (base, files)]
    return list(dict.fromkeys(found))


def _read_stat(path: Path) -> dict[str, int]:
    """A cgroup's memory.stat ("name value" lines)."""
    try:
        pairs = [line.split() for line in path.read_text().splitlines()]
    except OSError:
        return {}
    return {pair[0]: int(pair[1]) for pair in pairs if len(pair) == 2 and pair[1].isdigit()}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
