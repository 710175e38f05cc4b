"""Downstream probes: tasks and splits (``tasks``), heads and training (``train``), metrics."""

from ofactl.probe.tasks import TASKS, TaskData, build_task
from ofactl.probe.train import ProbeConfig, ProbeResult, train_probe, train_probes

__all__ = ["TASKS", "ProbeConfig", "ProbeResult", "TaskData", "build_task", "train_probe", "train_probes"]
