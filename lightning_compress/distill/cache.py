"""Teacher outputs stored by sample index, so the teacher runs once per sample.

A cache holds either the teacher's full outputs or, with ``top_k``, its
:class:`~lightning_compress.distill.losses.TopKTargets` (the top-k logits, their indices
and two numbers per position: the log-normalizer and the log of the mass outside the top
k, both at the run's temperature).

On disk it is one safetensors file, written atomically (a crash leaves the old file or
the new one) and read without unpickling:

- tensors: ``indices`` (int64 ``[N]``, the sample indices ``index_fn`` gave) and either
  ``outputs`` (``[N, ...]`` full outputs, the teacher's dtype) or ``topk_values``
  (``[N, ..., k]``, the teacher's dtype), ``topk_indices`` (``[N, ..., k]``, int16 when
  the vocabulary is at most 32768, else int32), ``log_normalizer`` and ``log_rest``
  (``[N, ...]``, float32);
- metadata (strings): ``format``, ``version``, ``top_k`` (``""`` for full outputs) and,
  for top-k, ``temperature`` and ``vocab``. A file written with another ``top_k`` or
  another temperature is refused, naming the setting. (Files written before the metadata
  existed hold full outputs.)

What it holds is checked where a wrong target would otherwise train silently: each
sample's outputs must keep one shape (a batch padded to another length is refused, naming
the fix), and in each fit the first fully cached batch, and the first batch holding samples
held from before the fit (the file, an earlier fit), are compared with the teacher's own
outputs (:meth:`TeacherOutputCache.check_hit`), which refuses a cache computed by another
teacher or on other data under the same indices.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from lightning_compress.core.atomic import atomic_write
from lightning_compress.core.state import plain_setting
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill.cache_check import difference_from
from lightning_compress.distill.capture import as_float
from lightning_compress.distill.losses import TopKTargets

FORMAT = "lightning_compress.teacher_outputs"
_FIXED_SHAPE_HINT = (
    "a cache keeps one output per sample index, so each sample must have the same shape in every batch: pad"
    " sequences to one fixed length (e.g. `padding='max_length'`), not to the longest of each batch, or run"
    " without `cache`. A cache file computed on other data: delete it or choose another `cache_dir`"
)
VERSION = "2"
TOP_K_FIELDS = ("topk_values", "topk_indices", "log_normalizer", "log_rest")


def cached_top_k(logits: Tensor, top_k: int, temperature: float) -> TopKTargets:
    """What a cache with ``cache_top_k`` keeps of the teacher's ``logits``.

    Raises:
        ValueError: ``top_k`` is more than the outputs per position (naming ``cache_top_k``).
    """
    if not logits.dim() or top_k > logits.shape[-1]:
        raise ValueError(f"`cache_top_k`={top_k} is more than the teacher's {logits.shape[-1:].numel()} outputs"
                         " per position; choose a smaller `cache_top_k`")
    return TopKTargets.from_logits(logits, top_k, temperature)


def _one_index_per_sample(keys: List[int], samples: int) -> None:
    if len(keys) != samples:
        raise ValueError(f"`index_fn` returned {len(keys)} indices for a batch of {samples} teacher outputs; it must"
                         " return one index per sample")


def select_samples(outputs: Tensor | TopKTargets, positions: List[int]) -> Tensor | TopKTargets:
    """The samples at ``positions`` of a batch's outputs (full, or top-k targets), on CPU."""
    rows = torch.tensor(positions, dtype=torch.long)
    if isinstance(outputs, TopKTargets):
        return outputs.select(rows).to("cpu")
    return outputs[rows.to(outputs.device)].cpu()


class TeacherOutputCache:
    """Outputs in one contiguous tensor per field with a row per sample: a batch is one gather.

    (A dict of per-sample tensors costs a Python-level stack of every row each step,
    which on a 2048-sample batch was slower than the savings it was meant to buy.)

    Args:
        top_k: ``None`` to keep full outputs (tensors); else the ``k`` of the
            :class:`TopKTargets` it keeps.
        temperature: the temperature those top-k targets were computed at.
    """

    def __init__(self, top_k: int | None = None, temperature: float | None = None) -> None:
        self.top_k = top_k
        self.temperature = None if top_k is None else float(temperature)
        self.vocab: int | None = None
        self._rows: Dict[int, int] = {}
        self._fields: Dict[str, Tensor] = {}
        self.dirty = False
        self.path: Path | None = None  # the file it was loaded from, for messages
        # The checks of a fit (check_hit): a fully cached batch read back (its indices and inputs
        # stay the same: no augmentation, no batch positions as indices), and the samples held
        # from before the fit (a file, an earlier fit) not since rewritten, which that batch,
        # computed in this fit, may say nothing about.
        self.hit_checked, self.before_checked = False, True
        # Whether the outputs are logits a softmax loss reads (KL), which the check may shift.
        self.softmax_targets = True
        self._from_before: set = set()

    def __len__(self) -> int:
        return len(self._rows)

    def start_fit(self, path: Path | None) -> None:
        """A fit begins: the cache is kept at ``path`` (``None``: in memory); its first fully
        cached batch, and the first batch holding samples it held before this fit, are
        checked against the teacher (:meth:`positions_to_check`, :meth:`check_hit`)."""
        self.path, self._from_before = path, set(self._rows)
        self.hit_checked, self.before_checked = False, not self._from_before

    @property
    def verified(self) -> bool:
        """Whether this fit's checks are done."""
        return self.hit_checked and self.before_checked

    def positions_to_check(self, keys: List[int], hit: bool) -> List[int]:
        """The positions in ``keys`` (a batch, fully cached if ``hit``) whose cached outputs to
        compare with the teacher's: all of the fit's first fully cached batch, and until one
        passed, those of samples held from before the fit (in a batch computed anew too,
        before they are overwritten)."""
        if hit and not self.hit_checked:
            return list(range(len(keys)))
        if self.before_checked:
            return []
        return [position for position, key in enumerate(keys) if key in self._from_before]

    def lookup(self, keys: List[int], shape: torch.Size) -> Tensor | TopKTargets | None:
        """The outputs of ``keys`` in order (float32 or wider), or ``None`` if any of them is
        missing. ``shape``: the student's outputs for the batch, which the stored ones must have.

        Raises:
            ValueError: the stored outputs have another shape (variable-length batches, or
                a cache computed on other data).
        """
        _one_index_per_sample(keys, shape[0])
        rows = [self._rows.get(key) for key in keys]
        if not rows or any(row is None for row in rows):
            return None
        rows = torch.tensor(rows)
        fields = {name: values[rows] for name, values in self._fields.items()}
        first = self._value_field
        fields[first] = as_float(fields[first])  # stored in the teacher's dtype, computed with in float32
        if self.top_k is None:
            found = fields["outputs"]
        else:
            found = TopKTargets(*(fields[name] for name in TOP_K_FIELDS), self.vocab, self.temperature)
        if tuple(found.shape) != tuple(shape):
            raise ValueError(f"{self._name()} holds outputs of shape {tuple(found.shape)[1:]} per sample for this"
                             f" batch, but the student's are {tuple(shape)[1:]} per sample (batch outputs"
                             f" {tuple(shape)}); {_FIXED_SHAPE_HINT}")
        return found

    def check_hit(self, cached: Tensor | TopKTargets, fresh: Tensor | TopKTargets, keys: List[int],
                  hit: bool = True) -> None:
        """Compare outputs read from the cache for samples ``keys`` with the teacher's own for
        them (``hit``: they are a whole fully cached batch): a cache computed by another
        teacher, or on other data under the same sample indices, differs by tens of percent,
        or picks other top entries. Refused above 5% relative error, or under 90% agreement on
        the top entries where the teacher's margin is beyond rounding (a bfloat16 teacher's
        logits move by a step with the batch's composition on a GPU, which flips near-ties,
        not decided entries); how each is measured: :func:`~.cache_check.difference_from`.

        Raises:
            ValueError: they differ; the message says how much and what to do.
        """
        if tuple(cached.shape) != tuple(fresh.shape):
            raise ValueError(f"{self._name()} holds outputs of shape {tuple(cached.shape)[1:]} per sample, but the"
                             f" teacher's are {tuple(fresh.shape)[1:]}: it was computed by another teacher. "
                             + self._start_again())
        eps = torch.finfo(self._fields[self._value_field].dtype).eps
        error, agreement = difference_from(cached, fresh.to("cpu"), eps, self.softmax_targets)
        if not (error <= 0.05 and agreement >= 0.9):
            raise ValueError(
                f"{self._name()} does not hold this teacher's outputs for the samples of this batch (relative error"
                f" {error:.3g}, agreement on the top entries {agreement:.0%} against the teacher run on them): it was"
                " computed by another teacher, or on other data under the same sample indices, or the data gives a sample other"
                " inputs each epoch (random augmentation, which a cache cannot serve), or `index_fn` returns positions"
                " within the batch rather than each sample's own index in the dataset. " + self._start_again()
            )
        self.hit_checked = self.hit_checked or hit
        self.before_checked = self.before_checked or any(key in self._from_before for key in keys)

    def _start_again(self) -> str:
        if self.path is not None:
            return "Delete it or choose another `cache_dir` to compute the teacher's outputs again"
        return ("It was filled in an earlier fit of this callback or in this one: distill from other data or another"
                " teacher with a new KnowledgeDistillation")

    def store(self, keys: List[int], outputs: Tensor | TopKTargets, dtype: torch.dtype | None = None) -> None:
        """Keep ``outputs[i]`` (moved to CPU) as the output of sample ``keys[i]``; the outputs
        (top-k values) in ``dtype``, the teacher's own output dtype, in which they are exact.

        Raises:
            ValueError: for outputs of another kind (full or top-k), ``k``, temperature,
                vocabulary or shape per sample than the cache holds, or another number of
                them than ``keys``.
        """
        _one_index_per_sample(keys, outputs.shape[0])
        fields = self._as_fields(outputs)
        first = self._value_field
        if dtype is not None and dtype.is_floating_point and dtype.itemsize < fields[first].dtype.itemsize:
            fields[first] = fields[first].to(dtype)
        if not self._fields:
            capacity = max(len(keys), 1) * 4
            self._fields = {name: value.new_empty((capacity, *value.shape[1:])) for name, value in fields.items()}
        held = self._fields[first].shape[1:]
        if fields[first].shape[1:] != held:
            stored = (*held[:-1], self.vocab) if self.top_k is not None else tuple(held)
            raise ValueError(f"{self._name()} holds outputs of shape {tuple(stored)} per sample, and this batch's are"
                             f" {tuple(outputs.shape)[1:]}; {_FIXED_SHAPE_HINT}")
        self._from_before.difference_update(keys)
        for position, key in enumerate(keys):
            row = self._rows.get(key)
            if row is None:
                row = len(self._rows)
                if row == self._capacity():  # grow by doubling
                    self._fields = {name: _grown(values, row) for name, values in self._fields.items()}
                self._rows[key] = row
            for name, value in fields.items():
                self._fields[name][row] = value[position]
        self.dirty = True

    @property
    def nbytes(self) -> int:
        """Bytes of the stored outputs and sample indices (about the file's size)."""
        count = len(self._rows)
        return count * (8 + sum(values[0].numel() * values.element_size() for values in self._fields.values()))

    @property
    def full_nbytes(self) -> int:
        """Bytes the teacher's full outputs for the same samples would take."""
        if self.top_k is None or not self._fields:
            return self.nbytes
        values = self._fields["topk_values"]
        positions = values[0].numel() // self.top_k
        return len(self._rows) * (8 + positions * self.vocab * values.element_size())

    def report(self) -> str:
        """One line: the samples and bytes held, and (top-k) what full outputs would take."""
        mib = 2**20
        line = f"teacher-output cache: {len(self)} samples, {self.nbytes / mib:.2f} MiB"
        if self.top_k is not None and len(self):
            ratio = self.full_nbytes / self.nbytes
            versus = f"{ratio:.1f}x more" if ratio >= 1 else f"less: a `cache_top_k` this close to {self.vocab} saves nothing"
            line += (f" (top-{self.top_k} of {self.vocab} per position; full outputs would take"
                     f" {self.full_nbytes / mib:.2f} MiB, {versus})")
        return line

    def save(self, path: Path) -> None:
        """Write the cache to a safetensors file, atomically (the format is in the module docstring)."""
        from safetensors.torch import save_file

        count = len(self._rows)
        indices = torch.empty(count, dtype=torch.long)
        for key, row in self._rows.items():
            indices[row] = key
        tensors = {"indices": indices, **{name: values[:count].contiguous() for name, values in self._fields.items()}}
        metadata = {"format": FORMAT, "version": VERSION, "top_k": "" if self.top_k is None else str(self.top_k)}
        if self.top_k is not None:
            metadata.update(temperature=repr(self.temperature), vocab=str(self.vocab))
        # A crash never leaves half a cache.
        atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
        self.dirty = False

    @classmethod
    def load(cls, path: Path, top_k: int | None = None, temperature: float | None = None) -> "TeacherOutputCache":
        """The cache in ``path``, for a run with ``top_k`` and ``temperature``.

        Raises:
            ValueError: for a file written with another ``cache_top_k`` or ``temperature``
                (naming the setting), or one this format does not describe.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except (SafetensorError, OSError) as error:  # truncated, not safetensors, unreadable: no path or fix
            why = error
            if isinstance(error, OSError):
                why = f"{error}; {'a directory' if Path(path).is_dir() else 'a file without read permission reads as missing'}"
            raise ValueError(f"the teacher-output cache {str(path)!r} cannot be read ({why}); make it readable, or"
                             " delete it (or choose another `cache_dir`) to compute the teacher's outputs again") from None
        cache = cls(top_k, temperature)
        cache.path = Path(path)
        saved_k = metadata.get("top_k") or None
        if saved_k is not None and not saved_k.isdigit():
            raise ValueError(f"the teacher-output cache {str(path)!r} is malformed: its `top_k` is {saved_k!r}; delete it")
        if saved_k != (None if top_k is None else str(top_k)):
            held = "full teacher outputs" if saved_k is None else f"top-{saved_k} teacher outputs"
            raise ValueError(
                f"the teacher-output cache {str(path)!r} holds {held}, but this run has `cache_top_k`={top_k!r};"
                f" run with `cache_top_k`={None if saved_k is None else int(saved_k)!r}, or delete the file (or"
                " choose another `cache_dir`) to compute the teacher's outputs again"
            )
        expected = ("outputs",) if top_k is None else TOP_K_FIELDS
        if set(tensors) != {"indices", *expected} or tensors["indices"].dtype != torch.long:
            raise ValueError(
                f"the teacher-output cache {str(path)!r} holds {sorted(tensors)}, not the tensors a"
                f" {'full' if top_k is None else 'top-k'} cache writes; delete it to compute the teacher's outputs again"
            )
        if top_k is not None:
            if float(metadata.get("temperature", "nan")) != cache.temperature:
                raise ValueError(
                    f"the teacher-output cache {str(path)!r} was computed at `temperature`={metadata.get('temperature')},"
                    f" but this run has `temperature`={cache.temperature!r} (top-k targets hold probabilities at one"
                    " temperature); run with the cache's temperature, or delete the file (or choose another"
                    " `cache_dir`) to compute them again"
                )
            vocab = metadata.get("vocab", "")
            if not vocab.isdigit() or int(vocab) < top_k:
                raise ValueError(f"the teacher-output cache {str(path)!r} is malformed: its `vocab` is {vocab!r}")
            cache.vocab = int(vocab)
        indices = tensors["indices"]
        fields = {name: tensors[name] for name in expected}
        problem = None
        if indices.dim() != 1 or any(values.dim() == 0 or values.shape[0] != len(indices) for values in fields.values()):
            problem = "its tensors have different lengths"
        elif not fields[cache._value_field].dtype.is_floating_point:
            problem = f"its outputs are {fields[cache._value_field].dtype}, not floating point"
        elif len(set(indices.tolist())) != len(indices):
            problem = "it holds a sample index more than once"
        if problem is not None:
            raise ValueError(f"the teacher-output cache {str(path)!r} is malformed: {problem}; delete it to compute the"
                             " teacher's outputs again")
        if len(indices):  # (an empty file: an empty cache, which the first store shapes)
            cache._fields = fields
            cache._rows = {int(key): row for row, key in enumerate(indices.tolist())}
        return cache

    # ------------------------------------------------------------------ internals
    @property
    def _value_field(self) -> str:
        """The field holding the teacher's values (kept in its dtype): full outputs or top-k logits."""
        return TOP_K_FIELDS[0] if self.top_k is not None else "outputs"

    def _name(self) -> str:
        if self.path is None:
            return "the in-memory teacher-output cache"
        return f"the teacher-output cache {str(self.path)!r}{'' if self.path.exists() else ' (not yet written)'}"

    def _capacity(self) -> int:
        return next(iter(self._fields.values())).shape[0]

    def _as_fields(self, outputs: Tensor | TopKTargets) -> Dict[str, Tensor]:
        if self.top_k is None:
            if not isinstance(outputs, Tensor):
                raise ValueError("this cache keeps full teacher outputs (tensors), not top-k targets")
            return {"outputs": outputs.detach().cpu()}
        if not isinstance(outputs, TopKTargets) or outputs.k != self.top_k or outputs.temperature != self.temperature:
            raise ValueError(f"this cache keeps top-{self.top_k} targets at temperature {self.temperature}")
        if self.vocab is None:
            self.vocab = outputs.vocab
        elif outputs.vocab != self.vocab:
            raise ValueError(f"this cache keeps top-k targets over {self.vocab} outputs, not {outputs.vocab}")
        tensors = (outputs.values, outputs.indices, outputs.log_normalizer, outputs.log_rest)
        return {name: tensor.detach().cpu() for name, tensor in zip(TOP_K_FIELDS, tensors)}


def check_cache_dir(folder: Path) -> None:
    """Create the disk cache's folder before the first step, or name `cache_dir` and why
    not (it is written at the end of each epoch: an unwritable one failed there, unnamed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArgumentError(
            "cache_dir", f"`cache_dir` {folder} cannot be created ({error.strerror or error}); choose a folder this"
            " process can write to (in a recipe: distillation.cache_dir)"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(
            "cache_dir", f"`cache_dir` {folder} cannot be written (no write permission); choose a folder this process"
            " can write to (in a recipe: distillation.cache_dir)"
        )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s state (names, dtypes, shapes and bytes): which teacher a
    checkpoint was distilled from, without storing it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):  # extra state (get_extra_state), a quantized module's dtype
            digest.update(f"{name}={plain_setting(tensor)!r};".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _grown(values: Tensor, rows: int) -> Tensor:
    grown = values.new_empty((2 * rows, *values.shape[1:]))
    grown[:rows] = values[:rows]
    return grown


def sample_keys(indices: Any) -> List[int]:
    """``index_fn``'s sample indices as ints: integers, one per sample, none repeated (a
    repeated index would store or read one sample's teacher outputs for another's)."""
    try:
        tensor = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`index_fn` must return the batch's integer sample indices; it returned {indices!r}"
                         f" ({error})") from None
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"`index_fn` must return integer sample indices (a LongTensor); it returned {tensor.dtype}"
                         " values: return e.g. `batch['index']` from a dataset that yields each sample's index")
    keys = [int(i) for i in tensor.flatten().tolist()]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})[:8]
        raise ValueError(f"`index_fn` returned indices {repeated} more than once in one batch: each sample needs its"
                         " own index (the cache keeps one teacher output per index)")
    return keys


__all__ = ["TeacherOutputCache", "FORMAT", "TOP_K_FIELDS", "cached_top_k", "check_cache_dir", "sample_keys",
           "select_samples", "weights_fingerprint"]
