"""The fused kernel's build: $CC split like a shell word, a cache shared by processes and keyed
by the source (and flags, compiler, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from kvb_dist.native import build as native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

LOAD = "from kvb_dist.native import build; build.build(); print('loaded')"


def test_cc_is_split_like_a_shell_word(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -m64")
    assert native.compiler_command() == ["ccache", "gcc", "-m64"]
    monkeypatch.setenv("CC", "'/opt/my compilers/cc'")
    assert native.compiler_command() == ["/opt/my compilers/cc"]
    monkeypatch.delenv("CC")
    assert len(native.compiler_command()) == 1


@needs_compiler
def test_a_wrapper_in_cc_builds_a_working_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("KVB_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc')}")  # a wrapper, as ccache is
    kernel = native.build()
    queries = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    means = torch.tensor([[0.0, 0.1], [3.0, 2.9], [9.0, 9.0]])
    index, distance = torch.empty(2, dtype=torch.int64), torch.empty(2)
    kernel(queries, (-2 * means).contiguous(), means.pow(2).sum(1), index, distance)
    assert index.tolist() == [0, 1]


@needs_compiler
def test_the_library_is_cached_across_processes_and_rebuilt_when_the_source_changes(monkeypatch, tmp_path):
    env = dict(os.environ, KVB_DIST_CACHE_DIR=str(tmp_path))
    env.pop("CC", None)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "loaded", done.stderr
    libraries = list(tmp_path.glob(f"*/{native.LIBRARY_NAME}"))
    assert len(libraries) == 1  # the second process compiled nothing
    built_at = libraries[0].stat().st_mtime_ns
    # Another process loads the same file, without writing it again.
    subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert libraries[0].stat().st_mtime_ns == built_at

    changed = tmp_path / "changed" / "fused_nearest.c"
    changed.parent.mkdir()
    changed.write_text(native.SOURCE.read_text() + "\n/* a change */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    monkeypatch.setenv("KVB_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    native.build()
    assert len(list(tmp_path.glob(f"*/{native.LIBRARY_NAME}"))) == 2  # a new key, a new build
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temporary file left behind
