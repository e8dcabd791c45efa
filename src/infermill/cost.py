"""What a job costs: GPU-hours and tokens at the job file's prices (its ``cost`` section), spent
so far and forecast to the end, and whether that passes its budget.

A worker's GPU-hours are its running time times its GPUs (``cost.gpus_per_worker``, else what the
job gives each worker: ``inference.gpus_per_worker``, else ``tp x dp x pp`` for vllm and sglang,
1 for a custom server, 0 for an endpoint), times ``inference.replicas``. Tokens are the replies'
``usage``. The forecast is the spend so far, scaled from the documents processed to the job's
documents (once the plan knows them): the assumption is that the rest costs what the first did.
Each worker keeps the job's prices in its stats (``cost``), so ``infermill status OUTPUT`` and
the report price a job without its job file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Prices:
    """The job file's ``cost`` section, with the GPUs of a worker resolved."""

    gpu_hour: float = 0.0
    input_per_million: float = 0.0
    output_per_million: float = 0.0
    gpus_per_worker: float = 0.0
    budget: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prices:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def charge(self, worker_sec: float, prompt_tokens: float, completion_tokens: float) -> tuple[float, float]:
        """The GPU-hours and the cost of workers that ran ``worker_sec`` seconds in all for these tokens."""
        gpu_hours = worker_sec / 3600 * self.gpus_per_worker
        tokens = prompt_tokens / 1e6 * self.input_per_million + completion_tokens / 1e6 * self.output_per_million
        return gpu_hours, gpu_hours * self.gpu_hour + tokens


def prices_of(cost: Any, inference: Any) -> Prices | None:
    """The prices of a job file's ``cost`` section (None: no section) for a job of ``inference``
    (an ``InferenceConfig``): its workers' GPUs resolved (see the module docstring)."""
    if cost is None:
        return None
    gpus = cost.gpus_per_worker
    if gpus is None:
        if inference.gpus_per_worker is not None:
            gpus = inference.gpus_per_worker
        elif inference.server_type in ("vllm", "sglang"):
            gpus = inference.tp * inference.dp * inference.pp
        else:
            gpus = 1 if inference.server_type == "custom" else 0
        gpus *= inference.replicas
    return Prices(cost.gpu_hour, cost.input_per_million, cost.output_per_million, float(gpus), cost.budget)


@dataclass(frozen=True, slots=True)
class Spend:
    """A job's spend so far, and its forecast to the end (None until the job's size is known)."""

    gpu_hours: float
    cost: float
    forecast: float | None
    budget: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu_hours": round(self.gpu_hours, 4),
            "cost": round(self.cost, 4),
            "forecast": None if self.forecast is None else round(self.forecast, 4),
            "budget": self.budget,
        }

    def over_budget(self, forecast_trusted: bool = True) -> str | None:
        """Why the job passes its budget (spent, or forecast, if ``forecast_trusted``: once enough
        of the job ran for it to mean something), or None."""
        if self.budget is None:
            return None
        if self.cost > self.budget:
            return f"cost.budget {self.budget:g} is spent ({self.cost:.2f} so far)"
        if forecast_trusted and self.forecast is not None and self.forecast > self.budget:
            spent = f"{self.cost:.2f} so far"
            return f"the job's forecast cost {self.forecast:.2f} passes cost.budget {self.budget:g} ({spent})"
        return None


def spend(stats: dict[str, Any], documents_total: int | None) -> Spend | None:
    """The spend of a job (or worker run) with ``stats`` (summed stats with ``cost``: its prices),
    forecast over ``documents_total``; None for a job without prices."""
    if not isinstance(stats.get("cost"), dict):
        return None
    prices = Prices.from_dict(stats["cost"])
    gpu_hours, cost = prices.charge(
        float(stats.get("worker_time_sec") or stats.get("inference_time_sec") or 0.0),
        stats.get("prompt_tokens") or 0,
        stats.get("completion_tokens") or 0,
    )
    processed = stats.get("documents_processed") or 0
    forecast = cost * documents_total / processed if documents_total and processed else None
    return Spend(gpu_hours, cost, forecast, prices.budget)


@dataclass(frozen=True, slots=True)
class Forecast:
    """What a job will take, from its canary (``infermill check``): one document's tokens and
    latency, scaled to the job's documents, with ``concurrency`` requests in flight per worker."""

    documents: int
    prompt_tokens: float  # per document
    completion_tokens: float
    latency_sec: float  # of the canary's rollout
    concurrency: int
    prices: Prices | None

    @property
    def worker_hours(self) -> float:
        """One worker's hours for the whole job, as fast as ``concurrency`` canaries at once."""
        return self.documents * self.latency_sec / max(self.concurrency, 1) / 3600

    def lines(self) -> list[str]:
        """The forecast, with its assumptions, as ``infermill check`` prints it."""
        lines = [
            f"forecast for {self.documents:,} documents, if each costs what the first did "
            f"({self.prompt_tokens:,.0f} prompt and {self.completion_tokens:,.0f} completion tokens, "
            f"{self.latency_sec:.2f} s) with {self.concurrency} in flight per worker (a server that batches as well "
            "under load: a lower bound on time):",
            f"  tokens: {self.documents * self.prompt_tokens:,.0f} prompt, "
            f"{self.documents * self.completion_tokens:,.0f} completion",
            f"  time: {self.worker_hours:,.2f} worker-hours (divide by the workers)",
        ]
        if self.prices is not None:
            gpu_hours, cost = self.prices.charge(
                self.worker_hours * 3600, self.documents * self.prompt_tokens, self.documents * self.completion_tokens
            )
            budget = self.prices.budget
            over = f" (over cost.budget {budget:g})" if budget is not None and cost > budget else ""
            lines.append(f"  GPU-hours: {gpu_hours:,.2f}; cost: {cost:,.2f}{over}")
        return lines
