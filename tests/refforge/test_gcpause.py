import gc
import os
import subprocess
import sys
import threading
import weakref

import pytest

from refforge.gcpause import gc_paused


@pytest.fixture(autouse=True)
def _collector_enabled():
    gc.enable()
    yield
    gc.enable()


def test_pauses_nest_and_the_last_one_restores_the_collector():
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled():
    gc.disable()
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_exception_still_ends_the_pause():
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_each_pause_frees_the_cycles_made_meanwhile():
    class Cycle:
        pass

    with gc_paused():
        with gc_paused():
            a = Cycle()
            a.me = a
            ref = weakref.ref(a)
            del a
        # the inner pause ended while the outer one still holds the collector off: the cycle is gone
        assert ref() is None
        assert not gc.isenabled()


def test_overlapping_pauses_in_threads_keep_the_collector_off_until_the_last_ends():
    inside, release = threading.Barrier(3), threading.Event()
    states: list[bool] = []

    def unit():
        with gc_paused():
            inside.wait()
            release.wait()
            states.append(gc.isenabled())

    threads = [threading.Thread(target=unit) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()  # both threads are inside a pause
    assert not gc.isenabled()
    release.set()
    for t in threads:
        t.join()
    assert states == [False, False]
    assert gc.isenabled()


_BACKEND = "import sys; sys.argv = {argv!r}; import refforge, pyarrow; print(pyarrow.default_memory_pool().backend_name)"


@pytest.mark.parametrize(("argv", "want"), [
    (["/venv/bin/refforge", "export", "b", "--out", "o"], "system"),
    (["/venv/bin/refforge", "--debug", "export", "b"], "system"),
    (["/venv/bin/refforge", "build", "--out", "export"], None),  # a build keeps Arrow's default
    (["/venv/bin/other", "export"], None),
])
def test_the_export_command_chooses_the_system_allocator_before_pyarrow_loads(argv, want):
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    default = subprocess.run([sys.executable, "-c", "import pyarrow; print(pyarrow.default_memory_pool().backend_name)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    got = subprocess.run([sys.executable, "-c", _BACKEND.format(argv=argv)], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert got == (want or default)
    if want is None:
        assert default != "system"  # else the cases above could not tell the two apart
    # an allocator the user chose wins
    got = subprocess.run([sys.executable, "-c", _BACKEND.format(argv=argv)], capture_output=True, text=True,
                         check=True, env={**env, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}).stdout.strip()
    assert got == "jemalloc"
