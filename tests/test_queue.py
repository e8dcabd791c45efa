"""The shared work queue (infermill.queue): leases, fencing, attempts and status, with real
worker processes (tests/queue_worker.py), real files and real signals.

Leases time out after about a second here. A "dead" holder is made either for real (a
process SIGKILLed or SIGSTOPped) or, where only the count matters, by setting its lease's
mtime into the past, which is what a holder that stopped renewing leaves behind.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import orjson
import pytest

from conftest import PYTHON, ROOT
from helpers import wait_until
from infermill.errors import ConfigError, InfermillError, LeaseLostError, PlanReplacedError
from infermill.io.writers import JsonlWriter
from infermill.layout import JobLayout
from infermill.queue import Lease, LostOutput, WorkQueue
from infermill.worker import WorkerDeaths, discard, redo_lost_outputs

WORKER = Path(__file__).resolve().parent / "queue_worker.py"
TIMEOUT = 1.0  # lease_timeout_sec of these tests
START = 60.0  # how long a worker process may take to start on a loaded machine


def plan(units: int, documents: int = 10) -> dict:
    return {"units": [{"documents": documents} for _ in range(units)]}


def make_queue(folder: Path, worker: str, units: int | None = None, **options) -> WorkQueue:
    queue = WorkQueue(folder, worker, **{"lease_timeout_sec": TIMEOUT, **options})
    if units is not None:
        queue.publish_plan(plan(units))
    return queue


def age(lease: Lease, seconds: float = 60.0) -> None:
    """Make ``lease`` look as if its holder stopped renewing ``seconds`` ago."""
    past = os.stat(lease.path).st_mtime - seconds
    os.utime(lease.path, (past, past))


@pytest.fixture
def workers(tmp_path):
    """Start worker processes (``workers(mode, *args)``); every one is killed at the end."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def start(mode: str, *args: object) -> subprocess.Popen:
        log = open(tmp_path / f"worker_{len(started)}.out", "wb")  # noqa: SIM115 -- the child holds it
        proc = subprocess.Popen(
            [PYTHON, str(WORKER), mode, *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = START) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {proc.pid} did not exit within {timeout} s") from None
    outputs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker_*.out")))
    assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}:\n{outputs}"


def read_json(path: Path):
    return json.loads(path.read_text())


# -- many workers -----------------------------------------------------------------------------


def test_concurrent_workers_commit_every_unit_exactly_once(tmp_path, workers):
    units = 60
    folder, output, log = tmp_path / "queue", tmp_path / "out", tmp_path / "events.jsonl"
    output.mkdir()
    queue = make_queue(folder, "test", units)
    procs = [workers("drain", folder, f"w{i}", 30.0, output, log) for i in range(5)]
    wait_until(lambda: len(list(output.glob("ready_*"))) == len(procs), START, "the workers to start")
    (output / "go").touch()  # all at once, so that each gets a share
    for proc in procs:
        finish(proc, tmp_path)

    events = [json.loads(line) for line in log.read_text().splitlines()]
    claims = collections.Counter(e["claimed"] for e in events if "claimed" in e)
    commits = [e for e in events if "committed" in e]
    assert claims == {unit: 1 for unit in range(units)}  # no unit ever had two holders
    assert sorted(e["committed"] for e in commits) == list(range(units))
    assert all(e["counted"] and e["generation"] == 1 for e in commits)
    assert sorted(p.name for p in output.glob("unit_*")) == [f"unit_{u:06d}.txt" for u in range(units)]
    assert len({e["worker"] for e in commits}) > 1, "one worker did all the work"
    status = queue.status()
    assert (status.units_done, status.units_pending, status.units_in_progress) == (units, 0, 0)
    assert status.documents_done == status.documents_total == units * 10
    assert queue.drained() and queue.claim() is None


# -- dead, frozen and racing holders ------------------------------------------------------------


def test_a_killed_holders_unit_is_taken_over_after_the_lease_timeout(tmp_path, workers):
    timeout = 2.0
    folder, state = tmp_path / "queue", tmp_path / "holder.json"
    make_queue(folder, "planner", 1, lease_timeout_sec=timeout)
    holder = workers("hold", folder, "killed", timeout, state)
    wait_until(state.exists, START, "the holder's claim")
    holder.kill()
    holder.wait()
    other = make_queue(folder, "other", lease_timeout_sec=timeout)
    other.host = "another-host"  # as seen from another node, which cannot tell the holder is gone
    assert other.claim() is None  # renewed a moment ago: not stale yet
    taken: list[Lease] = []
    wait_until(lambda: taken.append(other.claim()) or taken[-1], 10 * timeout, "the takeover")
    assert (taken[-1].unit, taken[-1].generation) == (0, 2)
    assert other.commit(taken[-1], lambda: None, documents=1)


def test_workers_racing_over_one_stale_lease_elect_exactly_one(tmp_path, workers):
    folder = tmp_path / "queue"
    dead = make_queue(folder, "dead", 1)
    age(dead.claim())
    results = [tmp_path / f"claim_{i}.json" for i in range(4)]
    procs = [workers("claim", folder, f"racer{i}", TIMEOUT, result) for i, result in enumerate(results)]
    wait_until(lambda: all(r.with_name(r.name + ".ready").exists() for r in results), START, "the racers")
    for result in results:
        result.with_name(result.name + ".go").touch()
    for proc in procs:
        finish(proc, tmp_path)
    won = [read_json(result) for result in results if read_json(result) is not None]
    assert won == [{"unit": 0, "generation": 2}]


def test_renewal_and_commit_are_refused_after_a_takeover(tmp_path):
    folder = tmp_path / "queue"
    slow, fast = make_queue(folder, "slow", 1), make_queue(folder, "fast")
    lease = slow.claim()
    slow.renew(lease)
    age(lease)
    with pytest.raises(LeaseLostError, match="not renewed"):
        slow.renew(lease)
    taken = fast.claim()
    assert taken.generation == 2
    os.utime(lease.path)  # even a lease that looks fresh again: a higher generation exists
    with pytest.raises(LeaseLostError, match="taken over"):
        slow.renew(lease)
    written = []
    with pytest.raises(LeaseLostError):
        slow.commit(lease, lambda: written.append("slow"), documents=1)
    assert written == [] and not slow.holds(lease) and fast.holds(taken)
    assert fast.commit(taken, lambda: written.append("fast"), documents=1)
    assert written == ["fast"]


def test_a_worker_of_a_plan_replaced_by_another_command_renews_commits_and_claims_nothing(tmp_path):
    """Another command started the job over (its settings changed, nothing was committed):
    the old job's worker must not commit into the new job, even where generation numbers
    repeat (the new queue's first lease of a unit has the old one's name)."""
    folder = tmp_path / "queue"
    old = make_queue(folder, "old", 2)
    lease = old.claim()
    old_lease_name = lease.path.name
    shutil.rmtree(folder)  # as worker.discard does before the new job is published
    new = make_queue(folder, "new", 2)
    taken = [new.claim(), new.claim()]
    assert old_lease_name in {t.path.name for t in taken}, "the same lease file name, in the new job"
    written = []
    with pytest.raises(LeaseLostError, match="plan .* was replaced"):
        old.renew(lease)
    with pytest.raises(LeaseLostError, match="was replaced"):
        old.commit(lease, lambda: written.append("old"), documents=10)
    with pytest.raises(PlanReplacedError, match="another command started the job over"):
        old.claim()
    assert written == [] and not old.holds(lease)
    # stopping, it gives back or gives up nothing: the lease of that name is the new job's
    assert not old.abandon(lease)
    old.release(lease)
    assert all(new.holds(t) for t in taken)
    assert all(new.commit(t, lambda: written.append("new"), documents=10) for t in taken)
    assert written == ["new", "new"] and new.status().units_done == 2


def test_a_second_commit_of_a_unit_is_not_counted_twice(tmp_path):
    """A stale holder that slipped past its check: the unit and its documents count once."""
    folder = tmp_path / "queue"
    first, second = make_queue(folder, "first", 1), make_queue(folder, "second")
    lease = first.claim()
    assert first.commit(lease, lambda: None, documents=10)
    written = []
    assert not first.commit(lease, lambda: written.append(1), documents=10)
    assert written == []  # committed already: the output is not written again
    assert first.status().documents_done == 10
    assert second.claim() is None


def test_the_renewer_keeps_a_lease_alive_and_reports_it_lost(tmp_path):
    folder = tmp_path / "queue"
    holder, other = make_queue(folder, "holder", 1), make_queue(folder, "other")
    lease = holder.claim()
    lost: list[LeaseLostError] = []
    with holder.renewing(lease, on_lost=lost.append) as renewer:
        deadline = holder.storage_now() + 3 * TIMEOUT
        wait_until(lambda: holder.storage_now() > deadline, 10 * TIMEOUT, "three lease timeouts")
        assert other.claim() is None and not renewer.lost
        renewer.stop()  # as if the worker froze
        wait_until(lambda: other.claim() is not None, 10 * TIMEOUT, "the takeover")
    renewer = holder.renewing(lease, on_lost=lost.append)
    with renewer:  # (its report waited for: a renewer stopped reports nothing more)
        wait_until(lambda: renewer.lost and lost, 10 * TIMEOUT, "the renewer to notice and report")
    assert "not renewed" in renewer.reason or "taken over" in renewer.reason
    assert len(lost) == 1
    with pytest.raises(LeaseLostError):
        renewer.raise_if_lost()


# -- attempts and failures ----------------------------------------------------------------------


def test_a_unit_whose_holders_die_is_failed_after_max_attempts_and_a_rerun_retries_it(tmp_path):
    folder = tmp_path / "queue"
    make_queue(folder, "planner", 2)
    for attempt in range(1, 4):
        queue = make_queue(folder, f"doomed{attempt}", max_unit_attempts=3)
        lease = queue.claim()
        while lease.unit != 0:  # unit 1 is given back: a release is not an attempt
            other = queue.claim()
            queue.release(lease)
            lease = other
        assert lease.generation == attempt
        age(lease)  # its worker died
    survivor = make_queue(folder, "survivor", max_unit_attempts=3)
    lease = survivor.claim()
    assert lease.unit == 1  # the free unit first
    assert survivor.claim() is None  # unit 0 is marked failed now, not claimed a fourth time
    status = survivor.status()
    assert (status.units_failed, status.units_in_progress, status.units_pending) == (1, 1, 0)
    cause = status.failed[0].cause
    assert "3 times" in cause and "doomed3" in cause and status.failed[0].unit == 0
    assert survivor.commit(lease, lambda: None, documents=10)
    assert survivor.drained()

    assert survivor.reset_failed() == [0]
    assert not survivor.drained() and survivor.status().units_failed == 0
    retried = survivor.claim()
    assert (retried.unit, retried.generation) == (0, 4)
    age(retried)  # attempts count afresh from the reset: two more deaths are allowed
    assert survivor.claim().generation == 5


def test_a_unit_marked_failed_by_its_holder_is_retried_at_once_after_a_reset(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "worker", 1)
    lease = queue.claim()
    queue.fail(lease, "3 documents failed after 5 attempts each")
    with pytest.raises(LeaseLostError, match="given back"):
        queue.commit(lease, lambda: None, documents=1)
    assert queue.claim() is None and queue.drained()
    failure = queue.status().failed[0]
    assert failure.cause == "3 documents failed after 5 attempts each"
    assert (failure.worker, failure.generation) == ("worker", 1)
    assert queue.reset_failed() == [0]
    assert queue.reset_failed() == []
    assert queue.claim().generation == 2  # its lease was given back: no wait for it to go stale


# -- plan, status, journals, storage ------------------------------------------------------------


def test_the_first_plan_published_wins_under_concurrent_publishers(tmp_path, workers):
    folder = tmp_path / "queue"
    WorkQueue(folder)  # the folders exist before the race
    results = [tmp_path / f"publish_{i}.json" for i in range(5)]
    procs = [workers("publish", folder, f"publisher{i}", TIMEOUT, result) for i, result in enumerate(results)]
    wait_until(lambda: all(r.with_name(r.name + ".ready").exists() for r in results), START, "the publishers")
    for result in results:
        result.with_name(result.name + ".go").touch()
    for proc in procs:
        finish(proc, tmp_path)
    stored = [read_json(result) for result in results]
    assert all(plan == stored[0] for plan in stored)
    assert stored[0]["by"] in {f"publisher{i}" for i in range(5)}
    assert read_json(folder / "plan.json") == stored[0]
    assert WorkQueue(folder).publish_plan(plan(7)) == stored[0]  # a later one gets the stored plan too
    assert not list((folder).glob(".tmp-*"))


def test_status_counts_units_in_every_state(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 6)
    held = make_queue(folder, "busy")
    leases = [queue.claim() for _ in range(4)]
    assert queue.commit(leases[0], lambda: None, documents=7)
    queue.fail(leases[1], "bad documents")
    age(leases[2])  # stale: pending again
    busy = held.claim()
    status = queue.status()
    assert status.units_total == 6 and status.documents_total == 60
    assert (status.units_done, status.units_failed, status.units_in_progress) == (1, 1, 2)
    assert status.units_pending == 2  # the stale one and the one never claimed
    assert status.documents_done == 7
    assert {holder.unit for holder in status.in_progress} == {leases[3].unit, busy.unit}
    assert {holder.worker for holder in status.in_progress} == {"me", "busy"}
    assert all(0 <= holder.renewed_sec_ago < TIMEOUT for holder in status.in_progress)
    assert [holder.unit for holder in status.stale] == [leases[2].unit]
    assert status.failed[0].cause == "bad documents"
    assert json.loads(json.dumps(status.as_dict()))["units_in_progress"] == 2


def test_each_holder_has_its_own_journal_and_sees_the_earlier_ones(tmp_path):
    queue = make_queue(tmp_path / "queue", "me", 2)
    paths = {queue.journal_path(unit, generation) for unit in (0, 1) for generation in (1, 2, 3)}
    assert len(paths) == 6
    for generation in (1, 2):
        queue.journal_path(0, generation).write_text("replies")
    queue.journal_path(1, 1).write_text("another unit")
    assert queue.earlier_journals(0, 3) == [queue.journal_path(0, 2), queue.journal_path(0, 1)]
    assert queue.earlier_journals(0, 1) == []


def test_the_queue_lives_in_the_jobs_folder_and_refuses_remote_storage(tmp_path):
    layout = JobLayout.for_output(str(tmp_path / "out"))
    queue = WorkQueue.for_layout(layout, "me")
    assert queue.folder == tmp_path / "out" / "_infermill" / "queue"
    with pytest.raises(ConfigError, match="network.*not s3://bucket/q"):
        WorkQueue("s3://bucket/q")
    with pytest.raises(InfermillError, match="no plan"):
        queue.claim()


def test_a_new_command_counts_the_attempts_of_a_unit_anew(tmp_path):
    def two_dead_holders(folder: Path) -> WorkQueue:
        queue = make_queue(folder, "first", 1, max_unit_attempts=2)
        for generation in (1, 2):  # two holders that died (their leases never given back), as if killed
            lease = queue.claim()
            assert lease is not None and lease.generation == generation
            age(lease)
        return make_queue(folder, "second", max_unit_attempts=2)

    same_command = two_dead_holders(tmp_path / "a")
    assert same_command.claim() is None and same_command.status().units_failed == 1  # its attempts are spent
    new_command = two_dead_holders(tmp_path / "b")
    assert new_command.reset_attempts() == [0]
    lease = new_command.claim()
    assert lease is not None and lease.generation == 3 and new_command.status().units_failed == 0


# -- corrupt files ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["emptied", "torn", "not a plan"])
def test_a_corrupt_plan_is_named_with_how_to_recover(tmp_path, damage):
    folder = tmp_path / "queue"
    make_queue(folder, "planner", 3)
    path = folder / "plan.json"
    data = path.read_bytes()
    path.write_bytes({"emptied": b"", "torn": data[: len(data) // 2], "not a plan": b"[1, 2, 3]"}[damage])
    queue = make_queue(folder, "resumer")
    for read in (queue.plan, queue.status, queue.unit_counts, lambda: queue.publish_plan(plan(3))):
        with pytest.raises(InfermillError) as raised:
            read()
        message = str(raised.value)
        assert f"{path} is corrupt" in message, message
        assert "delete it and run the same command" in message and "--overwrite" in message, message


def test_a_lease_dated_in_the_future_is_taken_over_a_lease_timeout_after_it_is_first_seen(tmp_path):
    """A storage clock set back, or a forged lease: its date cannot say its holder is alive."""
    folder = tmp_path / "queue"
    holder = make_queue(folder, "holder", 1)
    lease = holder.claim()
    other = make_queue(folder, "other")
    other.host = "another-host"  # as seen from another node, which cannot tell whether the holder lives
    future = holder.storage_now() + 3600
    os.utime(lease.path, (future, future))
    first_seen = other.storage_now()
    assert other.claim() is None  # not at once: a live holder renews it back to the present
    taken: list[Lease] = []
    wait_until(lambda: taken.append(other.claim()) or taken[-1], 10 * TIMEOUT, "the takeover")
    assert other.storage_now() - first_seen >= TIMEOUT
    assert (taken[-1].unit, taken[-1].generation) == (0, 2)
    with pytest.raises(LeaseLostError, match="taken over"):
        holder.renew(lease)


def test_a_live_holder_keeps_its_lease_dated_in_the_future(tmp_path):
    folder = tmp_path / "queue"
    holder = make_queue(folder, "holder", 1)
    lease = holder.claim()
    other = make_queue(folder, "other")
    other.host = "another-host"
    with holder.renewing(lease) as renewer:
        future = holder.storage_now() + 3600
        os.utime(lease.path, (future, future))
        deadline = other.storage_now() + 3 * TIMEOUT
        taken: list[Lease | None] = []
        wait_until(
            lambda: taken.append(other.claim()) or taken[-1] is not None or other.storage_now() > deadline,
            20 * TIMEOUT,
            "three lease timeouts",
        )
        assert not any(taken) and not renewer.lost
    assert holder.status().in_progress[0].renewed_sec_ago >= 0  # renewed back to the present


def test_a_done_mark_names_the_output_it_committed(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 2)
    lease = queue.claim()
    assert queue.commit(lease, lambda: {"file": "00000_00001.jsonl", "bytes": 123, "records": 10}, documents=10)
    mark = read_json(folder / "units" / f"{lease.unit:06d}.done")
    assert mark["output"] == {"file": "00000_00001.jsonl", "bytes": 123, "records": 10}
    assert mark["documents"] == 10 and mark["generation"] == 1


def test_a_unit_redone_is_claimable_at_once_and_its_last_attempt_does_not_count(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 1, max_unit_attempts=1)
    lease = queue.claim()
    assert queue.commit(lease, lambda: None, documents=10)
    other = make_queue(folder, "other", max_unit_attempts=1)
    other.host = "another-host"  # cannot tell whether the last holder lives: only a lease given back is free
    assert queue.redo([LostOutput(0, "00000_00000.jsonl", "is missing", generation=1)]) == [(0, 0)]
    again = other.claim()
    assert again is not None and again.generation == 2
    assert other.status().units_done == 0 and other.status().units_failed == 0


def test_a_lease_given_back_by_a_holder_killed_between_its_mark_and_its_delete_reads_as_given_back(tmp_path):
    """Giving a lease back is two steps on a store without rename (the released mark, then the
    lease's delete); a holder killed between them leaves both, which reads as given back: the
    unit is claimable at once and that generation is no attempt."""
    queue = make_queue(tmp_path, "me", 1, lease_timeout_sec=600, max_unit_attempts=1)
    lease = queue.claim()
    assert lease is not None
    released = lease.path.with_name(lease.path.name.replace(".lease", ".released"))
    released.write_bytes(b"{}")  # killed before it deleted the lease
    other = make_queue(tmp_path, "other", lease_timeout_sec=600, max_unit_attempts=1)
    other.host = "another-host"  # cannot tell whether the holder lives: only the mark frees the unit
    assert other.status().units_pending == 1 and other.status().units_in_progress == 0
    again = other.claim()  # at once, and not failed: the one attempt allowed is still there
    assert again is not None and again.generation == 2


def test_a_redo_of_a_command_that_died_midway_is_taken_over_and_finished(tmp_path):
    """A command redoing a unit claims that (``U.g.redo``) so that no two redo it; one killed
    before it finished leaves its claim, which the next command takes over (its writer, of
    this host, is gone) instead of leaving the unit's output lost for ever."""
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 1)
    lease = queue.claim()
    assert queue.commit(lease, lambda: None, documents=10)
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = folder / "units" / "000000.00001.redo-1"
    claim.write_bytes(orjson.dumps({"worker": "dead", "host": queue.host, "pid": int(dead.stdout)}))
    removed = []
    assert queue.redo([LostOutput(0, "00000_00000.jsonl", "is missing", generation=1)], removed.append) == [(0, 0)]
    assert removed == [0] and not claim.exists() and queue.status().units_done == 0
    assert not list((folder / "units").glob("*.redo-*"))  # its claim (redo-2) and the dead one's, deleted
    again = queue.claim()
    assert again is not None and again.generation == 2


def test_two_commands_taking_over_a_dead_commands_redo_at_once_redo_it_once(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 1)
    assert queue.commit(queue.claim(), lambda: None, documents=10)
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "units" / "000000.00001.redo-1").write_bytes(
        orjson.dumps({"worker": "dead", "host": queue.host, "pid": int(dead.stdout)})
    )
    commands = [make_queue(folder, f"command{i}") for i in range(2)]
    barrier = threading.Barrier(2)
    removed: list[int | str] = []
    redone: list[list[tuple[int, int]]] = []

    def redo(command: WorkQueue) -> None:
        barrier.wait()
        redone.append(command.redo([LostOutput(0, "00000_00000.jsonl", "is missing", generation=1)], removed.append))

    threads = [threading.Thread(target=redo, args=(command,)) for command in commands]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(redone) == [[], [(0, 0)]] and removed == [0]  # one took the dead command's claim over


def test_a_unit_being_redone_by_a_live_command_is_left_to_it(tmp_path):
    folder = tmp_path / "queue"
    queue = make_queue(folder, "me", 1, lease_timeout_sec=600)
    lease = queue.claim()
    assert queue.commit(lease, lambda: None, documents=10)
    other = make_queue(folder, "other", lease_timeout_sec=600)
    (folder / "units" / "000000.00001.redo-1").write_bytes(other._record(generation=1))  # its redo under way
    assert queue.redo([LostOutput(0, "00000_00000.jsonl", "is missing", generation=1)]) == []
    assert queue.status().units_done == 1


def test_a_lease_given_up_on_an_error_is_an_attempt_taken_over_at_once(tmp_path):
    first = make_queue(tmp_path, "first", units=1, lease_timeout_sec=600, max_unit_attempts=2)
    second = make_queue(tmp_path, "second", lease_timeout_sec=600, max_unit_attempts=2)
    lease = first.claim()
    assert lease is not None and second.claim() is None  # held, live, this very process: not taken
    assert first.abandon(lease)
    assert first.units_attempted_by(os.getpid()) == [0]  # an attempt, by this process
    again = second.claim()  # at once, not after the 600 s lease timeout
    assert again is not None and again.generation == 2
    assert not first.abandon(lease)  # superseded: nothing to give up
    assert second.abandon(again)
    assert first.claim() is None and first.status().units_failed == 1  # two attempts spent: failed


def test_the_failed_units_message_says_how_many_of_the_others_are_done(tmp_path):
    from infermill.worker import failed_units_error

    queue = make_queue(tmp_path, "w", units=3)
    leases = [queue.claim() for _ in range(3)]
    by_unit = {lease.unit: lease for lease in leases if lease is not None}
    queue.fail(by_unit[0], "record 1 failed: HTTP 400")
    queue.commit(by_unit[1], lambda: None, documents=10)
    message = str(failed_units_error(queue))
    assert "1 of 3 units failed" in message and "1 of the other 2 units are done; fix the cause" in message
    queue.commit(by_unit[2], lambda: None, documents=10)
    assert "The other units are done; fix the cause" in str(failed_units_error(queue))


def commit_records(queue: WorkQueue, writer: JsonlWriter, lease: Lease, texts: list[str]) -> None:
    def write_output() -> dict:
        written = writer.write_chunk(({"id": text, "text": text} for text in texts), 0, lease.unit)
        return writer.written(0, lease.unit, written)

    assert queue.commit(lease, write_output, documents=len(texts))


def test_a_command_redoing_a_unit_from_an_out_of_date_list_leaves_the_unit_redone_since_alone(tmp_path):
    """Commands B and C start together and both find unit 0's output lost; B redoes it first.
    C's redo, from its list made before, must neither take back the lease of B's worker nor,
    once that worker committed, delete its output and done mark."""
    folder, writer = tmp_path / "queue", JsonlWriter(str(tmp_path / "out"))
    first = make_queue(folder, "first", 1)
    commit_records(first, writer, first.claim(), ["a", "b"])
    output = tmp_path / "out" / "00000_00000.jsonl"
    output.unlink()
    b, c = make_queue(folder, "b"), make_queue(folder, "c")
    listed_by_b, listed_by_c = b.check_outputs(writer).lost, c.check_outputs(writer).lost
    assert [(e.unit, e.generation) for e in listed_by_c] == [(0, 1)], listed_by_c
    assert b.redo(listed_by_b, lambda unit: writer.remove_chunk_file(0, unit)) == [(0, 0)]
    lease = b.claim()
    assert lease is not None and lease.generation == 2
    assert c.redo(listed_by_c, lambda unit: writer.remove_chunk_file(0, unit)) == []
    b.renew(lease)  # still B's worker's
    commit_records(b, writer, lease, ["a", "b"])
    mark = (folder / "units" / "000000.done").read_bytes()
    assert c.redo(listed_by_c, lambda unit: writer.remove_chunk_file(0, unit)) == []
    assert output.exists() and (folder / "units" / "000000.done").read_bytes() == mark
    assert c.check_outputs(writer, verify=True).lost == [] and c.status().units_done == 1


def test_an_output_rewritten_with_its_records_at_another_size_is_not_lost(tmp_path):
    """A stale holder that wakes after a takeover may replace a committed unit's file with the
    same documents at another size (sampled replies): verify counts its records."""
    folder, writer = tmp_path / "queue", JsonlWriter(str(tmp_path / "out"))
    queue = make_queue(folder, "me", 1)
    lease = queue.claim()
    commit_records(queue, writer, lease, ["a", "b", "c"])
    writer.write_chunk([{"id": t, "text": t * 10} for t in "abc"], 0, 0)  # the other holder's replies
    assert queue.check_outputs(writer, verify=True).lost == []
    writer.write_chunk([{"id": t, "text": t} for t in "ab"], 0, 0)  # a record short
    lost = queue.check_outputs(writer, verify=True).lost
    assert [(e.unit, e.generation) for e in lost] == [(0, 1)] and "holds 2 records, not 3" in lost[0].problem, lost
    assert queue.check_outputs(writer).lost == []  # a command starting looks only for missing files


def test_a_lease_dated_in_the_future_is_logged_once_though_renewals_date_it_ahead_again(tmp_path, caplog):
    folder = tmp_path / "queue"
    holder = make_queue(folder, "holder", 1)
    lease = holder.claim()
    other = make_queue(folder, "other")
    other.host = "another-host"
    for ahead in (3600, 3610, 3620):  # each renewal on a node whose clock runs ahead
        future = holder.storage_now() + ahead
        os.utime(lease.path, (future, future))
        assert other.claim() is None
    warnings = [r for r in caplog.records if "in the future" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_many_lost_outputs_are_logged_in_one_warning(tmp_path, caplog):
    folder, writer = tmp_path / "queue", JsonlWriter(str(tmp_path / "out"))
    queue = make_queue(folder, "me", 15)
    while (lease := queue.claim()) is not None:
        commit_records(queue, writer, lease, ["a"])
    for path in (tmp_path / "out").glob("*.jsonl"):
        path.unlink()
    caplog.set_level("WARNING", logger="infermill.worker")
    redo_lost_outputs(queue, writer)
    warnings = [r.getMessage() for r in caplog.records if r.name == "infermill.worker"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("15 done unit(s) lost their output") and "and 5 more" in warnings[0], warnings
    assert "--overwrite" in warnings[0] and "new output folder" in warnings[0], warnings
    assert queue.status().units_done == 0


def test_a_units_second_crash_is_not_a_death_in_vain_and_fresh_units_first_crashes_are(tmp_path):
    # the --workers parent's judge: a poison unit that crashes worker after worker spends its
    # attempts (towards failed), however fast the crashes come; deaths on fresh units with no
    # progress between them look like a broken server, and end the replacements
    queue = WorkQueue(tmp_path / "queue", "parent")
    queue.publish_plan({"units": [{"documents": 1}] * 10})
    deaths = WorkerDeaths(queue, max_in_vain=1)
    assert deaths.replace([3]) is None  # unit 3's first crash: in vain, 1 of 1 allowed
    assert deaths.replace([3]) is None  # its second (before any other unit finished): not in vain
    assert deaths.replace([3]) is None
    assert deaths.replace([5]) is not None  # a fresh unit's first crash, nothing done meanwhile: 2 in vain

    broken = WorkerDeaths(WorkQueue(tmp_path / "queue", "parent"), max_in_vain=1)
    assert broken.replace([1]) is None
    why = broken.replace([2])
    assert why is not None and "deaths in vain" in why
    assert WorkerDeaths(queue, max_in_vain=0).replace([]) is not None  # died before claiming a unit


def test_starting_a_job_over_deletes_the_file_of_a_unit_killed_between_its_output_and_its_done_mark(tmp_path):
    layout = JobLayout.for_output(str(tmp_path / "out"))
    writer = JsonlWriter(str(tmp_path / "out"))
    queue = WorkQueue.for_layout(layout, "killed")
    queue.publish_plan({"units": [{"documents": 1}] * 3})
    lease = queue.claim()
    assert lease is not None
    orphan = tmp_path / "out" / writer.filename(0, lease.unit)  # its output renamed in place, then the kill
    orphan.write_text('{"id": "doc-0", "text": "from the job before"}\n')
    other = tmp_path / "out" / "notes.txt"  # not the job's: kept
    other.write_text("mine")
    discard(layout, writer)
    assert not orphan.exists() and other.exists()
    assert not layout.queue.exists()
