"""The two S3 servers of the tests (SeaweedFS, moto) do what the queue needs of a store: create if
absent and compare-and-swap answered 412 when their condition fails, one winner of a race to create,
the store's time, ranged reads and listing by prefix; and their fixtures leave no process behind."""

from __future__ import annotations

import threading

import obstore
import psutil
import pytest
from obstore.exceptions import AlreadyExistsError, PreconditionError

import s3_servers

SERVERS = ["seaweedfs", "moto_s3"]


@pytest.fixture(params=SERVERS)
def server(request) -> s3_servers.S3Server:
    return request.getfixturevalue(request.param)


def test_create_if_absent_answers_412_on_an_existing_key(server):
    bucket = server.new_bucket()
    client = server.client()
    client.put_object(Bucket=bucket, Key="lease", Body=b"one", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key="lease", Body=b"two", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="lease")["Body"].read() == b"one"
    # the same through obstore, the library kept (benchmarks/README.md)
    store = server.store(bucket)
    obstore.put(store, "lease2", b"one", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "lease2", b"two", mode="create")
    assert obstore.get(store, "lease2").bytes().to_bytes() == b"one"


def test_compare_and_swap_answers_412_on_a_stale_etag(server):
    bucket = server.new_bucket()
    store = server.store(bucket)
    first = obstore.put(store, "lease", b"one", mode="create")
    second = obstore.put(store, "lease", b"two", mode={"e_tag": first["e_tag"]})
    assert second["e_tag"] != first["e_tag"]
    with pytest.raises(PreconditionError):
        obstore.put(store, "lease", b"three", mode={"e_tag": first["e_tag"]})
    assert obstore.get(store, "lease").bytes().to_bytes() == b"two"
    # and as plain HTTP: 412
    client = server.client()
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key="lease", Body=b"three", IfMatch=first["e_tag"])
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert obstore.head(store, "lease")["e_tag"] == second["e_tag"]


def test_a_race_of_16_creators_has_one_winner(server):
    bucket = server.new_bucket()
    store = server.store(bucket)
    for round_ in range(1):  # SeaweedFS makes losers wait (1 s steps, up to ~5 s): a round takes seconds there
        key = f"unit-{round_}"
        start = threading.Barrier(16)
        winners: list[int] = []
        losers: list[int] = []
        errors: list[BaseException] = []

        def claim(worker: int, key: str = key, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                obstore.put(store, key, str(worker).encode(), mode="create")
                winners.append(worker)
            except AlreadyExistsError:
                losers.append(worker)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(winners) == 1 and len(losers) == 15, (round_, winners, losers)
        assert obstore.get(store, key).bytes().to_bytes() == str(winners[0]).encode()


def test_the_store_tells_its_time_and_serves_ranges_and_prefixes(server):
    bucket = server.new_bucket()
    store = server.store(bucket)
    data = bytes(range(200))
    obstore.put(store, "a/one", data)
    head = server.client().head_object(Bucket=bucket, Key="a/one")
    headers = head["ResponseMetadata"]["HTTPHeaders"]
    assert "last-modified" in headers and "date" in headers
    meta = obstore.head(store, "a/one")
    assert meta["last_modified"].tzinfo is not None and meta["size"] == 200 and meta["e_tag"]
    assert obstore.get_range(store, "a/one", start=10, end=20).to_bytes() == data[10:20]
    for key in ("a/two", "b/one", "ab/one"):
        obstore.put(store, key, b"x")
    listed = sorted(meta["path"] for batch in obstore.list(store, prefix="a/") for meta in batch)
    assert listed == ["a/one", "a/two"]
    obstore.delete(store, "a/two")
    listed = sorted(meta["path"] for batch in obstore.list(store, prefix="a/") for meta in batch)
    assert listed == ["a/one"]


@pytest.mark.parametrize("kind", ["moto"])  # SeaweedFS's: test_s3_jobs.py's own_seaweedfs (killed, restarted, stopped)
def test_a_stopped_server_leaves_no_process(kind, tmp_path):
    with s3_servers.running(kind, tmp_path) as server:
        pids = server.pids()
        assert pids, "the server runs as a process group"
        processes = [psutil.Process(pid) for pid in pids]
    for process in processes:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, process
    assert not server.pids()
    assert server.process.poll() is not None
    assert not [path for path in server.leftovers if path.exists()], "files left outside its folder"
