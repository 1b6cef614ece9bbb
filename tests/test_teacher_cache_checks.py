"""What a teacher-output cache holds is checked before it trains anything: a cache file
from another teacher or from other data under the same sample indices, and batches whose
samples change shape (dynamic padding), are refused with the fix named; a bfloat16
teacher's outputs are stored in bfloat16 (exactly). From a new user's trial: a reused
`cache_dir` distilled silently from the previous experiment's teacher, and a padded
batch of another length crashed inside the cache with a raw RuntimeError."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import KnowledgeDistillation
from lightning_compress.callbacks.distillation import CACHE_FILE
from lightning_compress.distill.cache import TeacherOutputCache
from lightning_compress.distill.losses import TopKTargets
from tests.conftest import ACCELERATOR, make_trainer
from tests.test_distill_topk import BATCH, LENGTH, SAMPLES, VOCAB, TinyLM, lm_states, sample_index  # noqa: F401

TOP_K = {"full": None, "top-k": 8}


def loader(seed: int = 0, lengths=None) -> DataLoader:
    """Samples ``(index, tokens)``; ``lengths``: cut batch i to ``lengths[i]`` tokens, as a
    collate function padding to the longest sample of each batch does."""
    tokens = torch.randint(0, VOCAB, (SAMPLES, LENGTH + 1), generator=torch.Generator().manual_seed(seed))
    dataset = TensorDataset(torch.arange(SAMPLES), tokens)
    if lengths is None:
        return DataLoader(dataset, batch_size=BATCH)
    batches = iter(lengths * SAMPLES)

    def collate(samples):
        index, tokens = torch.utils.data.default_collate(samples)
        return index, tokens[:, : next(batches) + 1]

    return DataLoader(dataset, batch_size=BATCH, collate_fn=collate)


def batches(*groups, seed: int = 0) -> DataLoader:
    """The samples of ``loader(seed)`` in the batches ``groups`` (lists of sample indices)."""
    return DataLoader(loader(seed).dataset, batch_sampler=[list(group) for group in groups])


def run(student_state, teacher_state, data: DataLoader, *, epochs: int = 1, teacher_dtype=None, **options):
    teacher = TinyLM(width=32)
    teacher.load_state_dict(teacher_state)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    if options.get("cache"):
        options["index_fn"] = options.pop("index_fn_override", sample_index)
    kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5, teacher_dtype=teacher_dtype, **options)
    model = TinyLM()
    model.load_state_dict(student_state)
    torch.manual_seed(1)
    make_trainer(max_epochs=epochs, callbacks=[kd]).fit(model, data)
    return kd, len(calls), model


def other_teacher(teacher_state):
    return {name: value * 1.5 if name == "head.weight" else value for name, value in teacher_state.items()}


@pytest.mark.parametrize("kind", TOP_K)
def test_a_cache_file_from_another_teacher_or_other_data_is_refused(lm_states, tmp_path, kind):
    student, teacher = lm_states
    options = dict(cache="disk", cache_dir=tmp_path, cache_top_k=TOP_K[kind])
    run(student, teacher, loader(), **options)
    before = (tmp_path / CACHE_FILE).read_bytes()
    with pytest.raises(ValueError, match=rf"teacher-output cache '.*{CACHE_FILE}' does not hold this teacher's outputs"
                                         r" .*computed by another teacher, or on other data"):
        run(student, other_teacher(teacher), loader(), **options)
    with pytest.raises(ValueError, match=r"agreement on the top entries \d+% against the teacher run on them"):
        run(student, teacher, loader(seed=5), **options)  # other tokens under the same sample indices
    assert (tmp_path / CACHE_FILE).read_bytes() == before  # refused, not overwritten
    _, calls, _ = run(student, teacher, loader(), **options)  # the same teacher and data pass the check
    assert calls == 1


def test_a_memory_cache_is_checked_again_in_each_fit(lm_states):
    student, teacher = lm_states
    teacher_model = TinyLM(width=32)
    teacher_model.load_state_dict(teacher)
    kd = KnowledgeDistillation(teacher_model, temperature=2.0, index_fn=sample_index, cache="memory")
    make_trainer(max_epochs=2, callbacks=[kd]).fit(TinyLM(), loader())  # all computed in this fit: nothing to check
    assert kd.output_cache.verified
    with pytest.raises(ValueError, match=r"the in-memory teacher-output cache does not hold this teacher's outputs.*"
                                         r" filled in an earlier fit of this callback or in this one: .* with a new KnowledgeDistillation"):
        make_trainer(max_epochs=1, callbacks=[kd]).fit(TinyLM(), loader(seed=5))


@pytest.mark.parametrize("kind", TOP_K)
def test_the_check_compares_samples_from_before_the_fit_not_a_batch_it_computed(lm_states, tmp_path, kind):
    # From a new user's trial: the first batch read from the cache had been computed earlier
    # in the same fit, so it "passed" the check, and the file's other samples, another
    # teacher's outputs, were then distilled from in silence.
    student, teacher = lm_states
    options = dict(cache="disk", cache_dir=tmp_path, cache_top_k=TOP_K[kind])
    run(student, teacher, batches(range(4, 8)), **options)  # samples 4-7 from the first teacher
    with pytest.raises(ValueError, match=r"does not hold this teacher's outputs"):
        # [0, 1] is computed, then read back (this fit's own: nothing proven); [4, 5] is the old teacher's
        run(student, other_teacher(teacher), batches([0, 1], [0, 1], [4, 5]), **options)
    # The same teacher passes, and a batch mixing new and old samples is compared on the old ones.
    kd, calls, _ = run(student, teacher, batches([0, 1], [0, 1], [0, 1, 4, 5], [6, 7]), **options)
    # [0, 1] computed, then checked (the fit's first full hit), [0, 1, 4, 5] checked on 4, 5, [6, 7] read
    assert calls == 3 and kd.output_cache.verified


def test_a_truncated_cache_file_is_refused_naming_it_and_the_fix(lm_states, tmp_path):
    student, teacher = lm_states
    (tmp_path / CACHE_FILE).write_bytes(b"\x08\x00\x00")
    with pytest.raises(ValueError, match=rf"the teacher-output cache '.*{CACHE_FILE}' cannot be read \(.*header.*\); make it readable, or"
                                         r" delete it"):
        run(student, teacher, loader(), cache="disk", cache_dir=tmp_path)


def test_a_cache_path_that_cannot_be_opened_is_refused_naming_it_and_the_fix(lm_states, tmp_path):
    student, teacher = lm_states
    (tmp_path / CACHE_FILE).mkdir()  # a folder where the file goes (safetensors: a raw OSError)
    with pytest.raises(ValueError, match=rf"the teacher-output cache '.*{CACHE_FILE}' cannot be read \(.*\); make it"
                                         r" readable, or delete it"):
        run(student, teacher, loader(), cache="disk", cache_dir=tmp_path)


def test_a_cache_dir_that_cannot_be_created_is_refused_before_training_naming_it(lm_states, tmp_path):
    """It was written first at the end of the first epoch, where a raw "[Errno 20] Not a
    directory" ended the run without naming `cache_dir`."""
    from lightning_compress import ArgumentError

    student, teacher = lm_states
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match=r"`cache_dir` .*file/cache cannot be created \(Not a directory\); choose"
                                            r" a folder this process can write to") as caught:
        run(student, teacher, loader(), cache="disk", cache_dir=tmp_path / "file" / "cache")
    assert caught.value.argument == "cache_dir"


def test_a_refused_disk_cache_deleted_as_advised_is_not_refused_again_by_the_same_callback(lm_states, tmp_path):
    # From a review: the callback kept the refused file's samples in memory and refused them
    # again after the file was deleted, naming a file that no longer existed.
    student, teacher = lm_states
    options = dict(cache="disk", cache_dir=tmp_path, index_fn=sample_index)
    run(student, teacher, loader(), **options)  # the first teacher's cache
    teacher_model = TinyLM(width=32)
    teacher_model.load_state_dict(other_teacher(teacher))
    kd = KnowledgeDistillation(teacher_model, temperature=2.0, **options)
    with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
        make_trainer(max_epochs=1, callbacks=[kd]).fit(TinyLM(), loader())
    (tmp_path / CACHE_FILE).unlink()
    make_trainer(max_epochs=1, callbacks=[kd]).fit(TinyLM(), loader())  # computes them again
    assert len(kd.output_cache) == SAMPLES and (tmp_path / CACHE_FILE).is_file()


def test_the_report_says_when_top_k_saves_nothing():
    cache = TeacherOutputCache(top_k=4, temperature=1.0)
    cache.store([0, 1], TopKTargets.from_logits(torch.randn(2, 3, 4), 4, 1.0))
    # per position: 4 float32 values + 4 int16 indices + 8 bytes (32) against 4 float32 logits (16)
    assert cache.nbytes == 2 * (8 + 3 * 32) and cache.full_nbytes == 2 * (8 + 3 * 16)
    assert cache.report().endswith("full outputs would take 0.00 MiB, less: a `cache_top_k` this close to 4 saves nothing)")


@pytest.mark.parametrize("kind", TOP_K)
def test_batches_padded_to_other_lengths_are_refused_naming_the_fix(lm_states, tmp_path, kind):
    student, teacher = lm_states
    with pytest.raises(ValueError, match=r"the in-memory teacher-output cache holds outputs of shape \(8, 512\) per"
                                         r" sample, and this batch's are \(6, 512\); .*pad sequences to one fixed length"):
        run(student, teacher, loader(lengths=[8, 6]), cache="memory", cache_top_k=TOP_K[kind])
    with pytest.raises(ValueError, match=rf"the teacher-output cache '.*new.*{CACHE_FILE}' \(not yet written\) holds"):
        run(student, teacher, loader(lengths=[8, 6]), cache="disk", cache_dir=tmp_path / "new", cache_top_k=TOP_K[kind])
    # A disk cache built at one length, read by batches of another: refused at the lookup.
    run(student, teacher, loader(), cache="disk", cache_dir=tmp_path, cache_top_k=TOP_K[kind])
    with pytest.raises(ValueError, match=r"holds outputs of shape \(8, 512\) per sample for this batch, but the"
                                         r" student's are \(6, 512\) per sample \(batch outputs \(8, 6, 512\)\)"):
        run(student, teacher, loader(lengths=[6]), cache="disk", cache_dir=tmp_path, cache_top_k=TOP_K[kind])


@pytest.mark.parametrize("kind", TOP_K)
def test_a_bfloat16_teachers_outputs_are_stored_in_bfloat16_exactly(lm_states, tmp_path, kind):
    student, teacher = lm_states
    kd, calls, _ = run(student, teacher, loader(), epochs=2, teacher_dtype=torch.bfloat16, cache="disk",
                       cache_dir=tmp_path, cache_top_k=TOP_K[kind])
    assert calls == SAMPLES // BATCH + 1  # epoch 1, and the check of epoch 2's first batch
    loaded = TeacherOutputCache.load(tmp_path / CACHE_FILE, TOP_K[kind], 2.0)
    stored = loaded._fields["outputs" if kind == "full" else "topk_values"]
    assert stored.dtype == torch.bfloat16
    # What a lookup gives back is the bfloat16 teacher's outputs, exactly (computed here on its
    # own, on the device the fit ran on: bfloat16 GEMMs round differently on another).
    device = "cpu" if ACCELERATOR == "cpu" else "cuda"
    model = TinyLM(width=32).to(device, torch.bfloat16)
    model.load_state_dict(teacher)
    index, tokens = next(iter(loader()))
    with torch.no_grad():
        logits = model(tokens[:, :-1].to(device)).float().cpu()
    found = loaded.lookup(index.tolist(), logits.shape)
    assert torch.equal(found if kind == "full" else found.values, logits if kind == "full" else logits.topk(8).values)
    width = VOCAB if kind == "full" else TOP_K[kind]
    extra = 0 if kind == "full" else SAMPLES * LENGTH * (TOP_K[kind] * 2 + 2 * 4)  # int16 indices, 2 float32 per position
    assert kd.output_cache.nbytes == SAMPLES * (8 + LENGTH * width * 2) + extra


def test_index_fn_giving_another_number_of_indices_is_refused():
    cache = TeacherOutputCache()
    with pytest.raises(ValueError, match=r"`index_fn` returned 3 indices for a batch of 2 teacher outputs"):
        cache.store([0, 1, 2], torch.zeros(2, 4))


def test_near_ties_flipped_by_rounding_are_not_taken_for_another_teacher():
    # A bfloat16 teacher on a GPU rounds its logits by a step differently with the batch's
    # composition, which can swap two entries that are within a step of each other.
    generator = torch.Generator().manual_seed(0)
    fresh = torch.randn(4, 6, 32, generator=generator)
    fresh[..., 0], fresh[..., 1] = 10.0, 9.9375  # one bfloat16 step apart at 10
    cached = fresh.clone()
    cached[..., 0], cached[..., 1] = 9.9375, 10.0
    cache = TeacherOutputCache()
    cache.store(list(range(4)), fresh, torch.bfloat16)
    cache.check_hit(cached, fresh, [0, 1, 2, 3])
    assert cache.verified
    decided = fresh.clone()
    decided[..., 1] = 4.0  # the top entry leads by 6: a swap now is another teacher's choice
    swapped = decided.clone()
    swapped[..., 0], swapped[..., 1] = 4.0, 10.0
    cache.hit_checked = False
    with pytest.raises(ValueError, match=r"agreement on the top entries 0% against the teacher run on them"):
        cache.check_hit(swapped, decided, [0, 1, 2, 3])
    assert not cache.verified


# ------------------------------------------------------------- from a second trial of the cache
def test_samples_from_before_are_compared_in_a_batch_computed_anew_before_they_are_overwritten(lm_states, tmp_path):
    # A run with another teacher that only saw mixed batches rewrote some samples and saved
    # them beside the old teacher's; the next run's first full hit was one of those and passed.
    student, teacher = lm_states
    options = dict(cache="disk", cache_dir=tmp_path)
    run(student, teacher, batches([0, 1], [2, 3]), **options)
    with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
        run(student, other_teacher(teacher), batches([0, 8], [1, 9]), **options)  # 0 and 1 are the first teacher's


def test_batch_positions_as_indices_are_refused_within_one_fit(lm_states):
    student, teacher = lm_states
    with pytest.raises(ValueError, match=r"`index_fn` returns positions within the batch"):
        run(student, teacher, loader(), epochs=1, cache="memory", index_fn_override=lambda batch: torch.arange(len(batch[0])))


def test_a_wrong_bfloat16_cache_is_refused_when_every_logit_shares_a_large_offset():
    # Softmax ignores the offset; compared raw, it hid the rest (2% relative error), and it
    # made every bfloat16 top entry look undecided (0.5 rounding steps at -100).
    generator = torch.Generator().manual_seed(0)
    fresh = (-100 + 1.7 * torch.randn(4, 6, 32, generator=generator)).bfloat16().float()
    other = (-100 + 1.7 * torch.randn(4, 6, 32, generator=generator)).bfloat16().float()
    cache = TeacherOutputCache()
    cache.store(list(range(4)), fresh, torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
        cache.check_hit(other, fresh, list(range(4)))
    one_step = fresh.clone()
    one_step[..., ::3] += 0.5  # one bfloat16 rounding step at 100, on a third of the logits
    cache.check_hit(one_step, fresh, list(range(4)))  # rounding, not another teacher
    shifted = fresh + 3.0  # the same softmax
    cache.hit_checked = False
    cache.check_hit(shifted, fresh, list(range(4)))


def test_a_teacher_with_other_outputs_than_the_cache_is_refused_naming_it():
    cache = TeacherOutputCache()
    cache.store([0, 1], torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"holds outputs of shape \(5,\) per sample, but the teacher's are \(7,\): it"
                                         r" was computed by another teacher"):
        cache.check_hit(cache.lookup([0, 1], torch.Size((2, 5))), torch.zeros(2, 7), [0, 1])


def test_index_fn_giving_fewer_indices_than_a_cached_batch_holds_is_refused_naming_it():
    cache = TeacherOutputCache()
    cache.store([0, 1], torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"`index_fn` returned 1 indices for a batch of 2 teacher outputs"):
        cache.lookup([0], torch.Size((2, 5)))


@pytest.mark.parametrize("tensors, metadata, problem", [
    ({"indices": torch.zeros(2, 2, dtype=torch.long), "outputs": torch.zeros(2, 5)}, {}, "different lengths"),
    ({"indices": torch.arange(2), "outputs": torch.zeros(2, 5, dtype=torch.int32)}, {}, "not floating point"),
    ({"indices": torch.tensor([3, 3]), "outputs": torch.zeros(2, 5)}, {}, "a sample index more than once"),
    ({"indices": torch.arange(2), "outputs": torch.zeros(2, 5)}, {"top_k": "abc"}, "its `top_k` is 'abc'"),
], ids=["2-D indices", "integer outputs", "repeated index", "top_k text"])
def test_a_malformed_cache_file_is_refused_naming_the_problem(tmp_path, tensors, metadata, problem):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / CACHE_FILE), metadata={"format": "lightning_compress.teacher_outputs", **metadata})
    with pytest.raises(ValueError, match=rf"is malformed: .*{problem}; delete it"):
        TeacherOutputCache.load(tmp_path / CACHE_FILE)


def test_an_empty_cache_file_loads_as_an_empty_cache_that_fills(tmp_path):
    from safetensors.torch import save_file

    save_file({"indices": torch.zeros(0, dtype=torch.long), "outputs": torch.zeros(0, 5)}, str(tmp_path / CACHE_FILE))
    cache = TeacherOutputCache.load(tmp_path / CACHE_FILE)
    cache.store([7, 8], torch.ones(2, 5))
    assert len(cache) == 2 and torch.equal(cache.lookup([8], torch.Size((1, 5))), torch.ones(1, 5))


# ------------------------------------------------------------- from a third trial of the cache
def checked(cached, fresh, softmax: bool = True):
    """Run the check of a cache holding ``cached`` against the teacher's ``fresh`` outputs."""
    cache = TeacherOutputCache(top_k=cached.k, temperature=cached.temperature) if isinstance(cached, TopKTargets) \
        else TeacherOutputCache()
    cache.softmax_targets = softmax
    keys = list(range(fresh.shape[0]))
    cache.store(keys, cached)
    cache.check_hit(cache.lookup(keys, fresh.shape), fresh, keys)


def test_regression_targets_are_compared_as_they_are_not_up_to_a_shift():
    # A one-wide MSE teacher always "agreed" once centred; a shifted one is another teacher.
    generator = torch.Generator().manual_seed(0)
    one_wide, three_wide = torch.randn(8, 1, generator=generator), torch.randn(8, 3, generator=generator)
    for cached, fresh in ((one_wide, torch.randn(8, 1, generator=generator)), (three_wide + 5.0, three_wide)):
        with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
            checked(cached, fresh, softmax=False)
    checked(three_wide + 5.0, three_wide, softmax=True)  # logits of a softmax loss: the same distribution
    checked(one_wide.clone(), one_wide, softmax=False)


def test_top_k_targets_are_compared_on_their_probabilities_indices_and_rest():
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(6, 4, 16, generator=generator)
    logits[..., 0] = logits.max() + 1  # one clear first entry, which k=1 keeps
    other = logits.clone()
    other[..., 1:] += torch.randn(6, 4, 15, generator=generator)  # the same first entry, another distribution
    swapped = logits.clone()
    second, third = logits.topk(3, dim=-1).indices[..., 1:].unbind(-1)
    swapped.scatter_(-1, second[..., None], logits.gather(-1, third[..., None]))
    swapped.scatter_(-1, third[..., None], logits.gather(-1, second[..., None]))
    lowered = logits.clone()
    lowered[logits < logits.topk(2, dim=-1).values[..., -1:]] -= 3.0  # only the mass outside the top 2 moves
    for k, wrong in ((1, 3 * logits), (1, other), (3, swapped), (2, lowered)):
        with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
            checked(TopKTargets.from_logits(wrong, k, 2.0), TopKTargets.from_logits(logits, k, 2.0))
    for k in (1, 3, 16):
        checked(TopKTargets.from_logits(logits, k, 2.0), TopKTargets.from_logits(logits, k, 2.0))


@pytest.mark.parametrize("k", [None, 16, 2], ids=["full", "k=vocab", "k=2"])
def test_a_teacher_masking_logits_with_minus_infinity_is_not_refused(k):
    # -inf - -inf is nan: a correct cache was refused with "relative error nan".
    logits = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    logits[..., 3:] = -math.inf
    same = logits.clone()
    if k is None:
        checked(same, logits)
    else:
        checked(TopKTargets.from_logits(same, k, 1.0), TopKTargets.from_logits(logits, k, 1.0))
    unmasked = logits.clone()
    unmasked[..., 3] = 0.0  # one entry the teacher masks is finite in the cache
    with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
        checked(unmasked if k is None else TopKTargets.from_logits(unmasked, 16, 1.0),
                logits if k is None else TopKTargets.from_logits(logits, 16, 1.0))


@pytest.mark.parametrize("mask", [-math.inf, torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("k", [None, 2, 7], ids=["full", "k=2", "k=7 (a masked entry kept)"])
def test_another_teacher_is_refused_behind_masks_and_a_shared_offset(mask, k):
    # From a fourth trial: masked entries zeroed before centring kept a +100 offset in, and
    # finfo.min masks outweighed every real difference (relative error ~0).
    generator = torch.Generator().manual_seed(0)
    first = 100 + 2 * torch.randn(3, 4, 8, generator=generator)
    first[..., 0] += 8  # a clear first entry, which the other teacher shares: only the rest differs
    second = first + 0.7 * torch.randn(3, 4, 8, generator=generator)
    for logits in (first, second):
        logits[..., 6:] = mask
    as_cached = (lambda x: x) if k is None else (lambda x: TopKTargets.from_logits(x, k, 1.0))
    with pytest.raises(ValueError, match="does not hold this teacher's outputs"):
        checked(as_cached(second), as_cached(first))
    checked(as_cached(first.clone()), as_cached(first))
