"""Import torchao quietly.

torchao's import logs a warning for each optional C extension it cannot load (CUDA
kernels on a CPU machine) and torch logs a deprecation for torchao's enum
registration; neither affects the CPU paths we use, so they are silenced here.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def import_torchao(module: str = "torchao") -> ModuleType:
    """``importlib.import_module(module)`` with torchao's import-time warnings silenced."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
