"""The markers ``make test-fast`` leaves out (``slurm or ray or vllm or chromium or model or s3``):
each test of a real Slurm cluster, Ray head, vLLM server, Chromium, model or S3 server carries its
own, skipped here or not, and the tests beside them that need none of those carry none."""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, ROOT

HEAVY = {"slurm", "ray", "vllm", "chromium", "model", "s3"}

#: pytest, collecting only, with a plugin that prints each test's markers as one JSON line
COLLECT = """
import json, sys
import pytest

class Markers:
    def pytest_collection_finish(self, session):
        markers = {item.nodeid: sorted({mark.name for mark in item.iter_markers()}) for item in session.items}
        print("MARKERS " + json.dumps(markers))

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Markers()]))
"""


def heavy_markers(*paths: str) -> dict[str, set[str]]:
    """The heavy markers of each test collected from ``paths`` (relative to the repository)."""
    result = subprocess.run(
        [PYTHON, "-c", COLLECT, *paths], cwd=ROOT, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("MARKERS ")]
    return {test: set(names) & HEAVY for test, names in json.loads(line.removeprefix("MARKERS ")).items()}


def test_tests_of_a_real_cluster_server_browser_model_or_store_carry_its_marker_and_the_others_none():
    markers = heavy_markers(
        "tests/test_slurm.py", "tests/test_ray.py", "tests/test_vllm_real.py", "tests/test_report.py",
        "tests/e2e/test_transformers_server.py", "tests/test_queue_s3.py", "tests/test_s3_jobs.py",
        "tests/test_card.py",
    )  # fmt: skip
    expected = {
        # by the fixture they use: slurm_cluster (through slurm), ray_head, model_dir
        "tests/test_slurm.py::test_an_array_of_three_workers_drains_2000_documents_each_once": {"slurm"},
        "tests/test_ray.py::test_two_ray_workers_complete_the_job_each_document_once": {"ray"},
        "tests/e2e/test_transformers_server.py::test_quickstart_server_answers_and_batches": {"model"},
        "tests/test_vllm_real.py::test_a_48_document_job_answers_every_document_exactly_once": {"vllm", "model"},
        # an S3 server: by its fixture (seaweedfs, moto_s3), or by a parameter naming it
        "tests/test_s3_jobs.py::test_overwrite_deletes_the_jobs_objects_in_the_store_and_runs_it_again": {"s3"},
        "tests/test_s3_jobs.py::test_two_commands_started_at_once_on_one_job_share_it[moto]": {"s3"},
        "tests/test_queue_s3.py::test_concurrent_workers_commit_every_unit_exactly_once[seaweedfs]": {"s3"},
        "tests/test_card.py::test_a_card_of_a_job_in_an_s3_store_is_uploaded_whole_beside_its_results": {"s3"},
        "tests/test_slurm.py::test_an_array_on_an_s3_output_shares_the_job_through_the_store": {"slurm", "s3"},
        # by their module or their own decorator
        "tests/test_vllm_real.py::test_a_bad_model_path_fails_fast_quoting_vllms_error": {"vllm"},
        "tests/test_report.py::test_report_of_a_real_job_plots_each_worker_and_the_total_and_renders_in_chromium": {
            "chromium"
        },
        # beside them, needing none of those: make test-fast runs them
        "tests/test_queue_s3.py::test_concurrent_workers_commit_every_unit_exactly_once[posix]": set(),
        "tests/test_slurm.py::test_dry_run_prints_the_whole_script_and_writes_and_submits_nothing": set(),
        "tests/test_ray.py::test_without_ray_the_ray_executor_says_which_extra_to_install_and_plans_nothing": set(),
        "tests/test_report.py::test_a_long_job_of_many_workers_stays_within_the_points_bound": set(),
    }
    assert {test: markers.get(test) for test in expected} == expected
