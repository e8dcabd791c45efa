"""JobLayout: where a job's own files go, for local and remote outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infermill.errors import ConfigError
from infermill.io.writers import JsonlWriter
from infermill.layout import JobLayout


@pytest.mark.parametrize("output", ["out", "~/infermill-layout-out", "file:///tmp/abs/out", "local:///tmp/abs/out"])
def test_a_local_output_keeps_everything_in_its_own_infermill_folder(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    layout = JobLayout.for_output(output)
    assert str(layout.root.parent) == JsonlWriter(output).root  # beside the data files, wherever fsspec puts them
    assert layout.checkpoints == layout.root / "checkpoints"
    assert layout.stats_file(0, 1) == layout.root / "stats.json"
    assert layout.stats_file(3, 4) == layout.root / "stats_rank_00003.json"
    assert layout.failures_file("w-1") == layout.root / "failures" / "w-1.jsonl"  # one file per worker
    assert layout.logs == layout.root / "logs"
    assert layout.rank_queue(0, 1) == layout.queue == layout.root / "queue"  # a stream of one rank: the job's queue
    assert layout.rank_queue(3, 4) == layout.root / "ranks" / "00003"


def test_a_remote_output_keeps_its_files_in_the_local_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="gs://bucket/out is remote.*checkpoint.dir"):
        JobLayout.for_output("gs://bucket/out")  # (an S3 output keeps them in its store: below)
    layout = JobLayout.for_output("s3://bucket/out", "ckpt")
    assert layout.root == layout.checkpoints == tmp_path / "ckpt"  # not the current folder itself
    assert layout.stats_file(0, 1) == tmp_path / "ckpt" / "stats.json"
    with pytest.raises(ConfigError, match="must be a local folder"):
        JobLayout.for_output("out", "s3://bucket/ckpt")


def test_an_s3_output_without_checkpoint_dir_keeps_the_jobs_state_in_its_store():
    layout = JobLayout.for_output("s3://bucket/some/out/")
    assert (layout.store, layout.store_root) == ("s3://bucket", Path("some/out/_infermill"))
    assert layout.queue == Path("some/out/_infermill/queue")  # a key in the store
    assert layout.root.name == "_infermill" and layout.root.is_absolute()  # each worker's local mirror
    assert layout.where(layout.worker_stats_file("w1")) == "s3://bucket/some/out/_infermill/stats/w1.json"
    assert layout.where(layout.queue) == "s3://bucket/some/out/_infermill/queue"
    assert JobLayout.for_output("s3://bucket/some/out").root == layout.root  # one mirror per output


def test_legacy_ranks_lists_an_older_infermills_rank_checkpoints_in_order(tmp_path):
    layout = JobLayout.for_output(str(tmp_path / "out"))
    for rank in (2, 0, 11):
        os.makedirs(layout.checkpoints / f"rank_{rank:05d}")
    (layout.checkpoints / "rank_notes").mkdir()
    (layout.checkpoints / "rank_00003.lock").touch()
    assert layout.legacy_ranks() == [0, 2, 11]


def test_rank_queues_lists_a_streams_ranks_in_order(tmp_path):
    layout = JobLayout.for_output(str(tmp_path / "out"))
    assert layout.rank_queues() == []
    for rank in (2, 0, 11):
        os.makedirs(layout.rank_queue(rank, 12))
    assert layout.rank_queues() == [layout.rank_queue(rank, 12) for rank in (0, 2, 11)]
