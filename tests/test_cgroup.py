"""CgroupDir against the host's real cgroup v2, under the tests' own cgroup root."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from conftest import TEST_CGROUP_ROOT
from corral.linux.cgroup import CgroupDir

pytestmark = pytest.mark.skipif(TEST_CGROUP_ROOT is None, reason="needs a writable cgroup v2 root of our own")


def test_reads_of_a_cgroup_removed_under_them_read_as_gone() -> None:
    """A cgroup removed between open and read gives ENODEV, not ENOENT (kernfs). gc removing
    a run's cgroup while `ps` or another gc reads it hit this for real (make stress gcrace):
    every reader must treat it as "gone", never raise it."""
    assert TEST_CGROUP_ROOT is not None
    path = TEST_CGROUP_ROOT / f"churn-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            try:
                path.mkdir()
            except FileExistsError:
                pass
            try:
                path.rmdir()
            except OSError:
                pass

    worker = threading.Thread(target=churn)
    worker.start()
    cg = CgroupDir(path)
    reads = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            ev = cg.events()
            assert not ev.populated and not ev.frozen
            assert cg.pids() == []
            assert cg.read_int("cgroup.freeze") in (None, 0)
            assert cg.cpu_usec() in (None, 0)
            assert cg.controllers() <= {"cpu", "memory", "pids", "io", "cpuset", "hugetlb", "rdma", "misc"}
            assert cg.wait_empty(0)  # opens cgroup.events: ENODEV on open, too
            cg.kill()  # an empty (or vanished) cgroup of our own: nothing to kill, no error
            reads += 1
    finally:
        stop.set()
        worker.join()
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
    assert reads > 100, "the race was exercised"


def test_enodev_is_what_the_kernel_gives() -> None:
    """The premise of the test above: an open cgroup file read after rmdir gives ENODEV."""
    assert TEST_CGROUP_ROOT is not None
    path = TEST_CGROUP_ROOT / f"gone-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    with open(path / "cgroup.events") as f:
        path.rmdir()
        with pytest.raises(OSError) as err:
            f.read()
    assert err.value.errno == 19
    assert CgroupDir(path).events().populated is False
