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
from model.errors import EngineFullError
from model.serving.engine import BatchEngine, RequestState
from model.serving.requests import (
    Request,
    RequestEvent,
    RequestResult,
    RequestStatus,
    ScheduledItem,
    SchedulerOutput,
    StepRecord,
)
from model.inference.compute import LayerCosts
from model.inference.decoder import Segment
from model.serving.runner import BlockRunner
from model.serving.scheduler import FULL_DEPTH_STRATEGIES, LOCKSTEP_STRATEGIES, STRATEGIES, Scheduler
from model.serving.worker import EngineWorker
from model.serving.workloads import WorkloadItem, WorkloadResult, compare_strategies, gantt_cells, run_workload, workload_metrics

__all__ = [
    "BatchEngine", "BlockRunner", "EngineFullError", "EngineWorker", "FULL_DEPTH_STRATEGIES", "LOCKSTEP_STRATEGIES",
    "LayerCosts", "Request", "RequestEvent", "RequestResult", "RequestState", "RequestStatus", "STRATEGIES",
    "ScheduledItem", "Scheduler", "SchedulerOutput", "Segment", "StepRecord", "WorkloadItem", "WorkloadResult",
    "compare_strategies", "gantt_cells", "run_workload", "workload_metrics",
]
