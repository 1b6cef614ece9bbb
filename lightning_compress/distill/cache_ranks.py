"""Keeping the ranks of a distributed run in step around their teacher-output caches.

Under DDP or FSDP2 each rank keeps its own cache of the samples it saw, so in one step a
rank may find its batch cached while another does not, and the checks of a fit
(:meth:`TeacherOutputCache.check_hit`) come in a different step on each rank. Two things must still happen on every rank at once:

- a sharded teacher (``teacher_strategy="fsdp2"``) runs as a collective, so it runs on every
  rank when any rank needs it, or on none (a rank skipping it would leave the others
  waiting in its all-gather forever);
- an error of the cache on one rank (``index_fn``, a shape, a refused cache) stops every
  rank in the same step, each with a message, instead of one rank raising while the others
  wait in the next gradient all-reduce.

Under a distributed run with a cache this costs an all-reduce of ``world_size + 1`` numbers
per step, and a second after the teacher's forward in steps where it runs; none in one
process.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
import torch.distributed as dist

from lightning_compress.core.distributed import all_reduce_sum_, is_distributed
from lightning_compress.distill.cache import TeacherOutputCache, select_samples


class CacheRankAgreement:
    """The decisions every rank of a fit must take together about the teacher and its cache.

    Args:
        sharded_teacher: the teacher's forward is a collective (FSDP2-sharded or holding
            DTensor parameters).
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
        flags = torch.zeros(world + 1, dtype=torch.float64)
        flags[rank], flags[world] = float(failure is not None), float(flag)
        all_reduce_sum_([flags])
        if failure is not None:
            raise failure
        failed = [str(r) for r in range(world) if flags[r] > 0]
        if failed:
            raise ValueError(
                f"KnowledgeDistillation: the teacher or its output cache failed on rank {', '.join(failed)} in this"
                " step (that rank's error names the cause and the fix), so every rank stops here rather than wait"
            )
        return bool(flags[world] > 0)

    def outputs(self, cache: TeacherOutputCache, keys_of_batch: Callable[[], List[int]], shape: torch.Size,
                teacher_args: Callable[[], Any], run_teacher: Callable[[Any], Any],
                teacher_dtype: Callable[[], torch.dtype | None]) -> Any:
        """The teacher's outputs for this step's batch: from ``cache`` where it holds the whole
        batch, else ``run_teacher(teacher_args())`` (then stored in ``teacher_dtype()``, that of
        its outputs); the fit's first fully cached batch, and samples held from before the fit
        until they passed once, are compared with the teacher's own outputs
        (:meth:`TeacherOutputCache.positions_to_check`, :meth:`TeacherOutputCache.check_hit`).

        An error on one rank stops every rank at once (:meth:`agree`), save one raised inside
        a sharded teacher's forward, whose collectives the other ranks are in by then.
        """
        keys = cached = failure = args = None
        check: List[int] = []
        try:  # what can fail on one rank before any collective: the batch's indices, shapes, inputs
            keys = keys_of_batch()
            cached = cache.lookup(keys, shape)
            check = cache.positions_to_check(keys, hit=cached is not None)
            args = teacher_args()
        except Exception as error:  # noqa: BLE001 - raised on every rank by agree()
            failure = error
        needed = cached is None or bool(check)
        needed_anywhere = self.agree(failure, needed)
        if not needed_anywhere:  # every rank reads its cache: nothing runs, nothing can fail
            return cached
        fresh = run_teacher(args) if self.sharded_teacher else None  # a collective: on every rank
        try:
            if needed and fresh is None:
                fresh = run_teacher(args)
            if check:  # compared before a batch computed anew overwrites them
                checked = [keys[position] for position in check]
                held = cache.lookup(checked, torch.Size((len(check), *shape[1:])))
                cache.check_hit(held, select_samples(fresh, check), checked, hit=cached is not None)
            if cached is None:
                cache.store(keys, fresh, teacher_dtype())
        except Exception as error:  # noqa: BLE001
            failure = error
        self.agree(failure)
        return fresh if cached is None else cached


__all__ = ["CacheRankAgreement"]
