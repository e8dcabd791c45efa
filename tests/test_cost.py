"""What a job costs: GPU-hours and tokens at the job file's prices, spent and forecast, shown by
`infermill status` and the run's summary, and a budget that stops the job cleanly."""

from __future__ import annotations

import json
import re

import pytest

from helpers import read_jsonl
from infermill.config import InferenceConfig
from infermill.cost import prices_of, spend
from infermill.jobfile import CostSection
from test_cli import SAMPLE, SAMPLE_DOCS, infermill, job_spec, output_of, write_job


@pytest.mark.parametrize(
    "inference, gpus",
    [
        ({"server_type": "vllm", "tp": 2, "dp": 2}, 4.0),
        ({"server_type": "vllm", "tp": 2, "replicas": 3}, 6.0),
        ({"server_type": "custom", "model_kwargs": {"server_script": "s.py"}}, 1.0),
        ({"server_type": "custom", "model_kwargs": {"server_script": "s.py"}, "gpus_per_worker": 8}, 8.0),
        ({"server_type": "endpoint", "endpoint_url": "http://h/v1"}, 0.0),
    ],
)
def test_a_workers_gpus_come_from_the_server_it_runs_unless_the_cost_section_says(inference, gpus):
    config = InferenceConfig(model_name_or_path="m", **inference)
    assert prices_of(CostSection(gpu_hour=2.0), config).gpus_per_worker == gpus  # type: ignore[union-attr]
    assert prices_of(CostSection(gpus_per_worker=0.5), config).gpus_per_worker == 0.5  # type: ignore[union-attr]
    assert prices_of(None, config) is None


def test_spend_is_gpu_hours_and_tokens_at_their_prices_and_the_forecast_scales_it_to_the_job():
    prices = {"gpu_hour": 2.0, "input_per_million": 1.0, "output_per_million": 4.0, "gpus_per_worker": 2, "budget": 10}
    stats = {"cost": prices, "worker_time_sec": 1800, "prompt_tokens": 1_000_000, "completion_tokens": 500_000,
             "documents_processed": 100}  # fmt: skip
    spent = spend(stats, documents_total=400)
    assert spent is not None
    assert (spent.gpu_hours, spent.cost, spent.forecast) == (1.0, 2.0 + 1.0 + 2.0, 20.0)
    assert spent.over_budget() == "the job's forecast cost 20.00 passes cost.budget 10 (5.00 so far)"
    assert spent.over_budget(forecast_trusted=False) is None
    assert spend({**stats, "worker_time_sec": 18000}, 400).over_budget() == "cost.budget 10 is spent (23.00 so far)"  # type: ignore[union-attr]
    assert spend({"prompt_tokens": 5}, 10) is None  # no prices, no cost


def priced_job(tmp_path, budget: float | None):
    """The sample job (60 documents, units of 10) on the dummy server, its tokens priced so that
    a document costs about 1."""
    spec = job_spec(tmp_path)
    spec["inference"] = {"server_type": "dummy", "model_name_or_path": "echo", "max_concurrent_generations": 2}
    spec["checkpoint"] = {"records_per_chunk": 10}
    spec["cost"] = {"input_per_million": 25_000, "output_per_million": 25_000, **({"budget": budget} if budget else {})}
    return write_job(tmp_path, spec)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_job_over_its_budget_stops_giving_its_units_back_and_goes_on_once_the_budget_is_raised(tmp_path, workers):
    job = priced_job(tmp_path, budget=20)
    stopped = infermill(tmp_path, "run", str(job), "--workers", workers)
    assert stopped.returncode == 4, output_of(stopped)
    over = r"error: (cost.budget 20 is spent|the job.s forecast cost .* passes cost.budget 20)"
    assert re.search(over, stopped.stderr), stopped.stderr
    status = infermill(tmp_path, "status", str(job), "--json")
    shown = json.loads(status.stdout)
    assert shown["state"] != "complete" and shown["units_done"] < 6, shown
    assert shown["in_progress"] == [] and shown["stale"] == [], shown  # given back, not left to expire
    cost = shown["cost"]
    assert 0 < cost["cost"] < 60 and cost["forecast"] > 20 and cost["budget"] == 20, cost
    shows_cost = workers == "1"  # (the table and the report show the same figures whatever the workers)
    if shows_cost:
        table = infermill(tmp_path, "status", str(job))
        assert "cost: " in table.stdout and "so far" in table.stdout and "budget 20" in table.stdout, table.stdout

    resumed = infermill(tmp_path, "run", str(job), "--workers", workers, "--set", "cost.budget=1000")
    assert resumed.returncode == 0, output_of(resumed)
    ids = sorted(r["id"] for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p))
    assert ids == sorted(json.loads(line)["id"] for line in SAMPLE.read_text().splitlines())
    assert len(ids) == SAMPLE_DOCS
    final = json.loads(infermill(tmp_path, "status", str(tmp_path / "out"), "--json").stdout)  # no job file
    assert final["state"] == "complete" and final["cost"]["budget"] == 1000, final
    assert 40 < final["cost"]["cost"] < 120 and final["cost"]["forecast"] == pytest.approx(final["cost"]["cost"])
    if shows_cost:
        report = infermill(tmp_path, "report", str(tmp_path / "out"), "-o", str(tmp_path / "report.html"))
        assert report.returncode == 0, output_of(report)
        page = (tmp_path / "report.html").read_text()
        assert re.search(
            r"<th>cost</th><td>[\d.,]+ so far \(0\.000 GPU-hours\), forecast [\d.,]+ for the whole job, budget 1000",
            page,
        )


def test_a_job_with_prices_shows_its_cost_in_the_summary(tmp_path):
    run = infermill(tmp_path, "run", str(priced_job(tmp_path, budget=None)))
    assert run.returncode == 0, output_of(run)
    assert "gpu hours" in run.stderr and "│ cost " in run.stderr, run.stderr


def test_check_forecasts_the_job_from_its_canary(tmp_path):
    result = infermill(tmp_path, "check", str(priced_job(tmp_path, budget=20)))
    assert result.returncode == 0, output_of(result)
    lines = result.stdout.splitlines()
    forecast = next(i for i, line in enumerate(lines) if line.startswith("forecast for 60 documents"))
    assert "with 2 in flight per worker" in lines[forecast], lines[forecast]
    assert lines[forecast + 1].startswith("  tokens: ") and lines[forecast + 2].startswith("  time: ")
    assert re.fullmatch(r"  GPU-hours: 0\.00; cost: [\d.]+ \(over cost.budget 20\)", lines[forecast + 3])
    assert lines[-1] == "check passed"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_progress_lines_show_the_cost_so_far(tmp_path, workers):
    from helpers import FAULTY_SERVER

    spec = job_spec(tmp_path)
    spec["inference"] = {
        "server_type": "custom",
        "model_name_or_path": "echo",
        "model_kwargs": {"server_script": str(FAULTY_SERVER), "directives": "sleep:0.05"},
        "max_concurrent_generations": 2,
        "server_ready_delay_sec": 0.05,
        "metric_interval": 0.2,
    }
    spec["checkpoint"] = {"records_per_chunk": 10}
    spec["cost"] = {"gpu_hour": 3600, "input_per_million": 25_000}  # a GPU-second costs 1
    run = infermill(tmp_path, "run", str(write_job(tmp_path, spec)), "--workers", workers)
    assert run.returncode == 0, output_of(run)
    lines = [
        line.split("progress: ", 1)[1] for line in run.stderr.splitlines() if "infermill.progress: progress: " in line
    ]
    costs = [float(m.group(1).replace(",", "")) for line in lines if (m := re.search(r"\| cost ([\d,.]+)", line))]
    assert costs and costs == sorted(costs) and costs[-1] > 0, lines
    if workers == "2":  # the parent's line: the job's cost, and its forecast once it knows the job's size
        assert any(re.search(r"\| cost [\d,.]+, forecast [\d,.]+$", line) for line in lines), lines
