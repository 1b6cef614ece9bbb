"""Weights & Biases: the logger factory and what only W&B can show.

Scalars never come here: the callbacks log them with ``pl_module.log``, so CSV,
TensorBoard and W&B all receive them. What needs W&B's own types (a per-layer table, a
line chart, an artifact) is logged by these helpers, on rank zero, and only when a
:class:`~lightning.pytorch.loggers.WandbLogger` is attached. ``wandb`` is imported
inside the functions that need it, so importing ``lightning_compress`` never imports or
initializes it.
"""

from __future__ import annotations

import inspect
import netrc
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

_DEFAULT_HOST = "https://api.wandb.ai"
_CHART_POINTS = 1000


def wandb_logger(project: str = "lightning-compress", save_dir: str | os.PathLike = ".", **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``, offline unless you have set W&B up for online runs.

    The run is offline (``mode="offline"``: everything is written under
    ``save_dir/wandb/offline-run-*``, nothing is sent; ``wandb sync <that dir>`` uploads
    it later) unless ``WANDB_MODE`` is set, which is then left to decide, or an API key
    is available: ``WANDB_API_KEY``, or a netrc entry for the W&B host (``wandb login``
    writes one; the host is ``WANDB_BASE_URL``'s, ``api.wandb.ai`` by default). An
    explicit ``offline=`` or ``mode=`` in ``kwargs`` always wins. Nothing starts until
    the logger's ``experiment`` is first used (by the Trainer, at fit start).

    Example::

        trainer = Trainer(logger=wandb_logger(save_dir="runs"), callbacks=[MagnitudePruning(0.8)])

    Args:
        project: the W&B project.
        save_dir: where the local run directory is written.
        kwargs: passed on to ``WandbLogger`` (and from there to ``wandb.init``).
    """
    if "offline" not in kwargs and "mode" not in kwargs:
        kwargs["offline"] = not online_configured()
    # wandb 0.18 (seen) writes the run to the system's temporary folder when ``dir`` does not exist.
    os.makedirs(save_dir, exist_ok=True)
    # Absolute: wandb's service process, started by the first run of this process, resolves
    # a relative path against its own working directory, which a later chdir leaves behind
    # (the run's files then went nowhere).
    return WandbLogger(project=project, save_dir=os.path.abspath(save_dir), **kwargs)


def online_configured() -> bool:
    """Whether ``WANDB_MODE`` is set or an API key is available (see :func:`wandb_logger`)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_run_dir(logger: WandbLogger) -> Optional[Path]:
    """The local directory of ``logger``'s run (``.../wandb/offline-run-<time>-<id>`` or
    ``run-...``: what ``wandb sync`` takes), or ``None`` for a disabled run. Starts the run
    if it has not started yet."""
    run = logger.experiment
    if getattr(run, "disabled", False):
        return None
    # ``run.dir`` is the run's ``files/`` folder in every wandb release we support
    # (``run.sync_dir``, its parent, is new in wandb 0.22).
    return Path(run.dir).parent


def find_wandb_logger(trainer) -> Optional[WandbLogger]:
    """The first ``WandbLogger`` among ``trainer.loggers``, or ``None``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


def log_table(trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Log a table (one ``wandb.Table`` under ``key``) to every logger that takes tables:
    ``WandbLogger.log_table`` and any logger with the same method. Rank zero only."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        log = getattr(logger, "log_table", None)
        if callable(log):
            # At the step the table describes (WandbLogger records it as trainer/global_step);
            # without it W&B files the table under the last step a scalar was logged at.
            at = {"step": trainer.global_step} if _takes_step(log) else {}
            log(key=key, columns=list(columns), data=[list(row) for row in rows], **at)


def _takes_step(log: Callable) -> bool:
    try:
        return "step" in inspect.signature(log).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def log_line_chart(
    trainer, key: str, xs: Sequence[float], y_of: Callable[[Any], float], *, x: str, y: str, title: str = ""
) -> None:
    """Log one line chart (``wandb.plot.line``) of ``y_of`` over ``xs`` under ``key``.

    W&B only, rank zero only; ``y_of`` is not called otherwise. More than 1000 ``xs`` are
    thinned to an even subset that keeps the first and the last, so a long run does not
    log a huge table.
    """
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    import wandb

    if len(xs) > _CHART_POINTS:
        stride = -(-len(xs) // _CHART_POINTS)
        xs = [*xs[::stride], *([xs[-1]] if (len(xs) - 1) % stride else [])]
    table = wandb.Table(columns=[x, y], data=[[value, y_of(value)] for value in xs])
    logger.log_metrics({key: wandb.plot.line(table, x, y, title=title)}, step=trainer.global_step)


def log_artifact(
    trainer, directory: str | os.PathLike, *, type: str = "model", metadata: Optional[Mapping[str, Any]] = None
) -> None:
    """Log ``directory`` as a W&B Artifact named after it (see :func:`artifact_name`).

    W&B only, rank zero only. W&B keeps a copy of the files until they are uploaded
    (at once online; at ``wandb sync`` offline), so the directory may change afterwards.
    """
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    import wandb

    artifact = wandb.Artifact(artifact_name(directory), type=type, metadata=dict(metadata or {}))
    artifact.add_dir(os.fspath(directory))
    logger.experiment.log_artifact(artifact)


def artifact_name(directory: str | os.PathLike) -> str:
    """W&B's artifact name for ``directory``: its last component, with every run of
    characters other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(os.fspath(directory)).resolve().name).strip("-.")
    return name[:128] or "model"


__all__ = [
    "wandb_logger",
    "wandb_run_dir",
    "online_configured",
    "find_wandb_logger",
    "log_table",
    "log_line_chart",
    "log_artifact",
    "artifact_name",
]
