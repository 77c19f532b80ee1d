"""Lightning callbacks for DeepSeek-V3 training: memory, communication, pipeline timeline, expert
load, throughput, and garbage collection in step on every rank. Each is an ordinary Callback:
scalars go to any logger, pictures to PNG files and to W&B when a WandbLogger is attached, and each
works with Lightning's own strategies where its data exists (see each module's docstring)."""

from lightning_dsv3.callbacks.communication import CommunicationStats
from lightning_dsv3.callbacks.expert_load import ExpertLoadMonitor
from lightning_dsv3.callbacks.garbage_collection import GarbageCollection
from lightning_dsv3.callbacks.memory import MemoryProfiler
from lightning_dsv3.callbacks.throughput import Throughput
from lightning_dsv3.callbacks.timeline import PipelineTimeline

__all__ = [
    "CommunicationStats",
    "ExpertLoadMonitor",
    "GarbageCollection",
    "MemoryProfiler",
    "PipelineTimeline",
    "Throughput",
]
