"""Keeping the ranks of a distributed run in step around their teacher-output caches.

Under DDP or FSDP2 each rank keeps its own cache of the samples it saw, so in one step a
rank may find its batch cached while another does not, and the check of each fit's first
batch read from before it (:meth:`TeacherOutputCache.check_hit`) comes in a different step
on each rank. Two things must still happen on every rank at once:

- a sharded teacher (``teacher_strategy="fsdp2"``) runs as a collective, so it runs on every
  rank when any rank needs it, or on none (a rank skipping it would leave the others
  waiting in its all-gather forever);
- an error of the cache on one rank (``index_fn``, a shape, a refused cache) stops every
  rank in the same step, each with a message, instead of one rank raising while the others
  wait in the next gradient all-reduce.

Under a distributed run with a cache this costs two all-reduces of ``world_size + 1``
numbers per step (before and after the teacher's forward), none in one process.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
import torch.distributed as dist

from lightning_compress.core.distributed import is_distributed
from lightning_compress.distill.cache import TeacherOutputCache


def _all_reduce_sum(values: List[float]) -> List[float]:
    flat = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        flat = flat.cuda()
    dist.all_reduce(flat)
    return flat.cpu().tolist()


class CacheRankAgreement:
    """The decisions every rank of a fit must take together about the teacher and its cache.

    Args:
        sharded_teacher: the teacher's forward is a collective (FSDP2-sharded).
    """

    def __init__(self, sharded_teacher: bool = False) -> None:
        self.sharded_teacher = sharded_teacher

    def agree(self, failure: BaseException | None, flag: bool = False) -> bool:
        """Whether ``flag`` is set on any rank; first, if this step failed on any rank
        (``failure``: this rank's error, or ``None``), raise on every rank: this rank's own
        error, or one naming the ranks that failed. Alone: raises ``failure``, returns ``flag``.

        Raises:
            Exception: ``failure``, or a ``ValueError`` where another rank failed.
        """
        if not is_distributed():
            if failure is not None:
                raise failure
            return flag
        world, rank = dist.get_world_size(), dist.get_rank()
        flags = [0.0] * (world + 1)
        flags[rank], flags[world] = float(failure is not None), float(flag)
        reduced = _all_reduce_sum(flags)
        if failure is not None:
            raise failure
        failed = [str(r) for r in range(world) if reduced[r] > 0]
        if failed:
            raise ValueError(
                f"KnowledgeDistillation's teacher-output cache failed on rank {', '.join(failed)} in this step (its"
                " error names the cause and the fix), so every rank stops here rather than wait for it"
            )
        return reduced[world] > 0

    def outputs(self, cache: TeacherOutputCache, keys_of_batch: Callable[[], List[int]], shape: torch.Size,
                run_teacher: Callable[[], Any], teacher_dtype: Callable[[], torch.dtype | None]) -> Any:
        """The teacher's outputs for this step's batch, from ``cache`` where it holds them all,
        else from ``run_teacher()`` (then stored in ``teacher_dtype()``, that of its outputs); a batch reading samples held
        from before this fit is run through the teacher too and compared
        (:meth:`TeacherOutputCache.check_hit`). Errors of the cache steps (``index_fn``, shapes,
        the check) stop every rank at once (:meth:`agree`)."""
        keys = cached = failure = None
        unchecked: List[int] = []
        try:
            keys = keys_of_batch()
            cached = cache.lookup(keys, shape)
            unchecked = cache.unchecked_positions(keys) if cached is not None else []
        except Exception as error:  # noqa: BLE001 - raised on every rank by agree()
            failure = error
        needed = cached is None or bool(unchecked)
        needed_anywhere = self.agree(failure, needed)
        fresh = None
        try:
            if needed or (self.sharded_teacher and needed_anywhere):  # a sharded forward is a collective
                fresh = run_teacher()
            if unchecked:
                cache.check_hit(cached, fresh, unchecked)
            elif cached is None:
                cache.store(keys, fresh, teacher_dtype())
        except Exception as error:  # noqa: BLE001
            failure = error
        self.agree(failure)
        return fresh if cached is None else cached
