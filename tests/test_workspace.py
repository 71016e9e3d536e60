"""Huge-page work buffers: the advice covers whole 2 MiB pages inside the buffer, never memory
outside it, and small buffers are left to malloc."""
from __future__ import annotations

import torch

from lib_merge.methods import workspace


def _record(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(workspace, "_madvise", lambda: lambda start, length: calls.append((start, length)))
    return calls


def test_advice_covers_only_whole_huge_pages_inside_the_buffer(monkeypatch):
    calls = _record(monkeypatch)
    buf = workspace.empty_large(3, 5_000_001)
    assert buf.shape == (3, 5_000_001) and buf.dtype == torch.float32
    (start, length), = calls
    first, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * 4
    assert start % workspace.HUGE_PAGE == 0 and length % workspace.HUGE_PAGE == 0
    assert first <= start and start + length <= end
    assert start - first < workspace.HUGE_PAGE and end - (start + length) < workspace.HUGE_PAGE


def test_small_buffers_and_missing_libc_are_left_alone(monkeypatch):
    calls = _record(monkeypatch)
    small = workspace.empty_large(1000)
    assert small.numel() == 1000 and not calls
    monkeypatch.setattr(workspace, "_madvise", lambda: None)
    assert workspace.empty_large(4_000_000).numel() == 4_000_000


def test_the_real_call_accepts_a_buffer():
    # on Linux this reaches madvise; anywhere else it is a no-op — either way the buffer works
    buf = workspace.empty_large(6_000_000)
    buf.fill_(2.0)
    assert float(buf.sum()) == 12_000_000.0
