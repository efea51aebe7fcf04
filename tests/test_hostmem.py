"""glibc malloc kept from handing freed activations back to the kernel (vlmbatch.engine.hostmem)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from vlmbatch.engine import hostmem
from vlmbatch.engine import scheduler as engine_module
from vlmbatch.engine.scheduler import Engine
from vlmbatch.model.loading import load_model, resolve_checkpoint
from vlmbatch.spec import GenerationSettings

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
PAGES = (48 << 20) // 4096  # one round's block

# Allocate, write and free a 48 MiB tensor (above the 32 MiB ceiling of glibc's own mmap threshold)
# again and again, and count the page faults once the process has settled: with glibc's defaults
# and after keep_freed_memory. (The heap takes a few rounds to settle: torch aligns its blocks, so a
# freed block is a little short for the next until its neighbours have been freed too.)
_FAULTS = """
import json, resource, torch
from vlmbatch.engine.hostmem import keep_freed_memory

def faults(rounds=12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
applied = keep_freed_memory()
faults()
print(json.dumps({"default": default, "applied": applied, "kept": faults()}))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    assert got["applied"] is True
    assert got["default"] > 6 * PAGES  # glibc maps each block afresh: every round faults its pages in
    assert got["kept"] < PAGES  # the heap has room for it: the block is reused
    assert hostmem.keep_freed_memory() is True  # and in this process too


def test_malloc_settings_of_the_users_own_are_left_alone():
    assert hostmem.user_tuned_malloc({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert hostmem.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"})
    assert not hostmem.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PATH": "/bin"})


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_an_environment_that_sets_malloc_keeps_its_settings():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    got = json.loads(out)
    assert got["applied"] is False
    assert got["kept"] > 6 * PAGES  # glibc's own behaviour


def test_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(hostmem.sys, "platform", "darwin")
    assert hostmem._mallopt({hostmem.M_MMAP_THRESHOLD: hostmem.MMAP_THRESHOLD}) is False


def test_a_cpu_engine_sets_it_and_a_cuda_engine_does_not(ckpt_pg1_untied, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(True) or True)
    model = load_model(resolve_checkpoint(str(ckpt_pg1_untied.path)))
    Engine(model, GenerationSettings())
    assert calls == [True]
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    Engine(model, GenerationSettings())
    assert calls == [True]
