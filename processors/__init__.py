"""The partitioned consumer runtime, the processors and the CLI."""

from processors.app import App
from processors.appender import Appender
from processors.partition import LoopConfig, PartitionLoop, PartitionState
from processors.port import Batch, EntryFailedError, Handled, HoldBack, Processor
from processors.runtime import Worker, WorkerConfig
from processors.settings import Settings

__all__ = [
    "App",
    "Appender",
    "Batch",
    "EntryFailedError",
    "Handled",
    "HoldBack",
    "LoopConfig",
    "PartitionLoop",
    "PartitionState",
    "Processor",
    "Settings",
    "Worker",
    "WorkerConfig",
]
