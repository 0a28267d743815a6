"""Serving: continuous depth-wise batching and the OpenAI-compatible server (docs/SERVING.md).

- ``requests``: ``Request``, its ``RequestStatus``, events, the scheduling decision, the log;
- ``scheduler``: ``Scheduler`` (pure Python: the complete decision of a step from request states);
- ``runner``: ``BlockRunner`` (decoder layers over many requests' segments at once), ``LayerCosts``;
- ``engine``: ``BatchEngine`` (per-request decoder state, the model runner, postprocessing);
- ``worker``: ``EngineWorker`` (one background thread, thread-safe submit/cancel);
- ``workloads``: run, measure and compare strategies on a workload; Gantt cells;
- ``http``: limits, request bodies, errors, the body limit, stop-string streaming;
- ``server``: the FastAPI app, ``python -m model.serving``.
"""
from ..errors import EngineFullError
from .engine import BatchEngine, RequestState
from .requests import (
    Request,
    RequestEvent,
    RequestResult,
    RequestStatus,
    ScheduledItem,
    SchedulerOutput,
    StepRecord,
)
from ..compute import LayerCosts
from ..engine import Segment
from .runner import BlockRunner
from .scheduler import FULL_DEPTH_STRATEGIES, LOCKSTEP_STRATEGIES, STRATEGIES, Scheduler
from .worker import EngineWorker
from .workloads import WorkloadItem, WorkloadResult, compare_strategies, gantt_cells, run_workload, workload_metrics

__all__ = [
    "BatchEngine", "BlockRunner", "EngineFullError", "EngineWorker", "FULL_DEPTH_STRATEGIES", "LOCKSTEP_STRATEGIES",
    "LayerCosts", "Request", "RequestEvent", "RequestResult", "RequestState", "RequestStatus", "STRATEGIES",
    "ScheduledItem", "Scheduler", "SchedulerOutput", "Segment", "StepRecord", "WorkloadItem", "WorkloadResult",
    "compare_strategies", "gantt_cells", "run_workload", "workload_metrics",
]
