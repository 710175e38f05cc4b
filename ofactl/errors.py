"""Error hierarchy. Library code raises these; only ``ofactl.cli`` turns them into messages."""

from __future__ import annotations


class OfactlError(Exception):
    """Base class: a problem the user can fix, reported as one line with exit code 1."""

    exit_code: int = 1


class ConfigError(OfactlError):
    """A preset, YAML file or ``--set`` override is invalid."""


class AudioError(OfactlError):
    """An audio file cannot be read or holds unusable samples."""


class CorpusError(OfactlError):
    """A corpus specification or manifest is invalid."""


class CheckpointError(OfactlError):
    """A checkpoint is missing, corrupt, untrusted or does not match what was asked."""


class StoreError(OfactlError):
    """A feature store is missing, locked, corrupt or made by another model."""


class ModelError(OfactlError):
    """Invalid model input or configuration (shapes, rates, layers)."""


class FolderBusy(OfactlError):
    """A run folder another live ofactl command is writing (its lock names that command)."""


class WriteError(OfactlError):
    """An output file cannot be written (a full disk, no permission); what was there is kept."""


class InterruptedRun(OfactlError):
    """Ctrl-C: the work done so far was saved; exit code 130 like other interrupted commands."""

    exit_code = 130


class TerminatedRun(InterruptedRun):
    """SIGTERM: the work done so far was saved; exit code 143 (128 + 15), as a shell reports it."""

    exit_code = 143


class HungUpRun(InterruptedRun):
    """SIGHUP (the terminal closed): the work done so far was saved; exit code 129 (128 + 1)."""

    exit_code = 129
