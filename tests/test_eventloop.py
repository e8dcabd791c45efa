"""infermill.eventloop: fewer garbage-collector passes while a run is going, restored after."""

from __future__ import annotations

import contextlib
import gc

import pytest

from helpers import dummy_config
from infermill import Document
from infermill.eventloop import GC_THRESHOLD, fewer_gc_passes
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner


@pytest.fixture
def default_gc():
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_the_young_generation_threshold_is_raised_inside_and_restored_after(default_gc):
    with fewer_gc_passes():
        assert gc.get_threshold() == (GC_THRESHOLD, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)
    with pytest.raises(RuntimeError), fewer_gc_passes():
        raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)


def test_a_higher_threshold_set_by_the_user_is_kept(default_gc):
    gc.set_threshold(100_000, 10, 10)
    with fewer_gc_passes():
        assert gc.get_threshold()[0] == 100_000


def test_overlapping_uses_restore_once_the_last_one_leaves(default_gc):
    with contextlib.ExitStack() as second_scope:
        with contextlib.ExitStack() as first_scope:
            first_scope.enter_context(fewer_gc_passes())
            second_scope.enter_context(fewer_gc_passes())
        # the first to enter has left first: the second still runs
        assert gc.get_threshold()[0] == GC_THRESHOLD
    assert gc.get_threshold() == (700, 10, 10)


def test_collection_turned_off_stays_off(default_gc):
    gc.set_threshold(0)
    with fewer_gc_passes():
        assert gc.get_threshold()[0] == 0


def test_a_change_made_during_the_block_is_kept(default_gc):
    with fewer_gc_passes():
        gc.set_threshold(5_000, 10, 10)
    assert gc.get_threshold() == (5_000, 10, 10)


def test_a_run_collects_less_often_while_it_goes_and_as_before_afterwards(tmp_path, default_gc):
    seen = []

    async def rollout(document, generate):
        seen.append(gc.get_threshold()[0])
        return (await generate({"messages": [{"role": "user", "content": document.text}]})).text

    config = dummy_config()
    InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run([Document(text="hi", id="1")])
    assert seen == [GC_THRESHOLD]
    assert gc.get_threshold() == (700, 10, 10)
