import gc
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
