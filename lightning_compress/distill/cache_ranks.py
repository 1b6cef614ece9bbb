"""Keeping the ranks of a distributed run in step around their teacher-output caches.

Under DDP or FSDP2 each rank keeps its own cache of the samples it saw, so in one step a
rank may find its batch cached while another does not, and the first hit of each fit, which
is compared with the teacher (:meth:`TeacherOutputCache.check_hit`), comes in a different
step on each rank. Two things must still happen on every rank at once:

- a sharded teacher (``teacher_strategy="fsdp2"``) runs as a collective, so it runs on every
  rank when any rank needs it, or on none (a rank skipping it would leave the others
  waiting in its all-gather forever);
- a cache refused on one rank stops every rank in the same step, each with a message,
  instead of one rank raising while the others wait in the next gradient all-reduce.

Each costs one all-reduce of a few numbers per step: the first only with a sharded teacher,
the second only until every rank has checked its first hit.
"""

from __future__ import annotations

from typing import Any, List

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
        self.settled = False  # every rank has checked its first hit in this fit

    def start_fit(self, sharded_teacher: bool) -> None:
        self.sharded_teacher, self.settled = sharded_teacher, False

    def teacher_needed(self, needed_here: bool) -> bool:
        """Whether to run the teacher in this step: where it is sharded, on every rank when any
        rank needs it (a rank that skipped it would stall the others' all-gathers)."""
        if not (self.sharded_teacher and is_distributed()):
            return needed_here
        return _all_reduce_sum([float(needed_here)])[0] > 0

    def check_first_hit(self, cache: TeacherOutputCache, cached: Any, fresh: Any) -> None:
        """Compare ``cached`` (this step's outputs read from ``cache``, or ``None``) with the
        teacher's ``fresh`` ones if it is the fit's first hit (:meth:`TeacherOutputCache.check_hit`),
        then :meth:`settle` with every rank."""
        failure = None
        if cached is not None and not cache.verified:
            try:
                cache.check_hit(cached, fresh)
            except ValueError as error:
                failure = str(error)
        self.settle(failure, cache.verified)

    def settle(self, failure: str | None, verified: bool) -> None:
        """After this step's cache check: raise on every rank when the check failed on any,
        in the same step (``failure``: this rank's message, or ``None``). Collective until
        every rank has ``verified`` its cache; alone, it raises ``failure`` if there is one.

        Raises:
            ValueError: this rank's check failed (its message), or another rank's did.
        """
        if self.settled:
            return
        if not is_distributed():
            self.settled = verified
            if failure is not None:
                raise ValueError(failure)
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        flags = [0.0] * (world + 1)
        flags[rank] = float(failure is not None)
        flags[world] = float(not verified)
        reduced = _all_reduce_sum(flags)
        failed = [r for r in range(world) if reduced[r] > 0]
        if failure is not None:
            raise ValueError(failure)
        if failed:
            raise ValueError(
                f"the teacher-output cache of rank {', '.join(map(str, failed))} was refused in this step (its error"
                " names the cause and the fix), so every rank stops here rather than wait for it"
            )
        self.settled = reduced[world] == 0
