"""KnowledgeDistillation(cache_top_k=K): the coarsened KL against a brute force, the top-k
teacher-output cache in a real Trainer (memory and disk, sizes, refusals, resume), and
teacher="self" with `fit(ckpt_path=...)` (the QAD recipe's way to start from float weights)."""

import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import KnowledgeDistillation, QuantizationAwareTraining
from lightning_compress.callbacks.distillation import CACHE_FILE
from lightning_compress.core.validate import ArgumentError
from lightning_compress.distill import cache as cache_module
from lightning_compress.distill.cache import TeacherOutputCache
from lightning_compress.distill.losses import TopKTargets, kl_divergence, reverse_kl_divergence, top_k_kl_divergence
from lightning_compress.recipes import RecipeError, load_recipe
from tests.cli_models import RecipeData, RecipeMLP
from tests.conftest import StopAfterEpoch, make_trainer

VOCAB, LENGTH, SAMPLES, BATCH = 512, 8, 24, 8


# ---------------------------------------------------------------------- numerics
def brute_coarsened_kl(student, teacher, k, temperature, reverse=False):
    """T**2 * mean over positions of KL between softmax(logits / T) coarsened to the
    teacher's k largest entries plus one bucket summing the rest, in float64 with plain
    softmax (no log-domain tricks, and the rest bucket summed, not 1 - sum)."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, teacher.shape[-1])
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    keep = t.argsort(dim=-1, descending=True, stable=True)[:, :k]
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, keep, False)
    p_c = torch.cat([p.gather(-1, keep), (p * outside).sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q.gather(-1, keep), (q * outside).sum(-1, keepdim=True)], -1)
    if k == t.shape[-1]:  # no rest bucket
        p_c, q_c = p_c[:, :-1], q_c[:, :-1]
    if reverse:
        p_c, q_c = q_c, p_c
    terms = torch.where(p_c > 0, p_c * (p_c.log() - q_c.log()), 0.0)
    return temperature**2 * terms.sum(-1).mean().item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 9, 10], ids=["k=1", "k=3", "k=vocab-1", "k=vocab"])
@pytest.mark.parametrize("reverse", [False, True], ids=["kl", "reverse_kl"])
def test_top_k_kl_is_the_kl_of_the_coarsened_distributions(temperature, k, reverse):
    generator = torch.Generator().manual_seed(k)
    student = torch.randn(2, 3, 10, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 10, generator=generator, dtype=torch.float64) * 3
    targets = TopKTargets.from_logits(teacher, k, temperature)
    got = top_k_kl_divergence(student, targets, temperature, reverse=reverse).item()
    assert got == pytest.approx(brute_coarsened_kl(student, teacher, k, temperature, reverse), rel=1e-9, abs=1e-12)
    full = (reverse_kl_divergence if reverse else kl_divergence)(student, teacher, temperature).item()
    assert got <= full + 1e-12  # coarsening never adds divergence
    if k == 10:
        assert got == pytest.approx(full, rel=1e-12)
        # float32, as in training: equal up to float32 rounding
        s32, t32 = student.float(), teacher.float()
        got32 = top_k_kl_divergence(s32, TopKTargets.from_logits(t32, k, temperature), temperature, reverse=reverse)
        full32 = (reverse_kl_divergence if reverse else kl_divergence)(s32, t32, temperature)
        assert got32.item() == pytest.approx(full32.item(), rel=2e-6)


def test_top_k_gradient_is_the_brute_force_gradient_and_targets_keep_their_dtypes():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    targets = TopKTargets.from_logits(teacher, 5, 2.0)
    (grad,) = torch.autograd.grad(top_k_kl_divergence(student, targets, 2.0), student)
    # Brute force with autograd: the coarsened KL written out with softmax and a gathered sum.
    keep = teacher.topk(5, -1).indices
    p, q = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    p_c = torch.cat([p.gather(-1, keep), 1 - p.gather(-1, keep).sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q.gather(-1, keep), 1 - q.gather(-1, keep).sum(-1, keepdim=True)], -1)
    (expected,) = torch.autograd.grad(4 * (p_c * (p_c.log() - q_c.log())).sum(-1).mean(), student)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)

    bf16 = TopKTargets.from_logits(torch.randn(2, 7, 300).bfloat16(), 4, 1.0)
    assert bf16.values.dtype == torch.bfloat16 and bf16.indices.dtype == torch.int16
    assert bf16.log_rest.dtype == bf16.log_normalizer.dtype == torch.float32 and bf16.shape == (2, 7, 300)
    assert TopKTargets.from_logits(torch.randn(1, 2**15), 2, 1.0).indices.dtype == torch.int16  # ids < 32768
    assert TopKTargets.from_logits(torch.randn(1, 2**15 + 1), 2, 1.0).indices.dtype == torch.int32
    with pytest.raises(ValueError, match="computed at temperature 1.0, not 2.0"):
        top_k_kl_divergence(torch.randn(2, 7, 300), bf16, 2.0)


# ---------------------------------------------------------------------- a tiny causal LM
class TinyLM(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + torch.cumsum(h, 1) / torch.arange(1, tokens.shape[1] + 1, device=h.device)[:, None]  # causal: a running mean
        return self.head(torch.tanh(self.mix(h)))

    def training_step(self, batch, batch_idx):
        _, tokens = batch
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader():
    tokens = torch.randint(0, VOCAB, (SAMPLES, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(SAMPLES), tokens), batch_size=BATCH)


def sample_index(batch):
    return batch[0]


@pytest.fixture(scope="module")
def lm_states():
    torch.manual_seed(0)
    student = {k: v.clone() for k, v in TinyLM().state_dict().items()}
    teacher = TinyLM(width=32)
    with torch.no_grad():
        teacher.head.weight.mul_(40.0)  # peaked like a trained LM: ~96% of its mass (T=2) in 8 tokens
    return student, {k: v.clone() for k, v in teacher.state_dict().items()}


class Checker(Callback):
    """With the pre-step weights, the brute-force coarsened and full KL of every step, and
    the kd loss the callback logged for it."""

    def __init__(self, teacher, k, temperature):
        self.teacher, self.k, self.temperature = TinyLM(width=32), k, temperature
        self.teacher.load_state_dict(teacher.state_dict())  # a copy without the call counter
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tokens = batch[1][:, :-1]
        self.teacher.to(pl_module.device)
        with torch.no_grad():
            s, t = pl_module(tokens), self.teacher(tokens)
        coarse = brute_coarsened_kl(s, t, self.k, self.temperature) if self.k else None
        self.pending = (coarse, kl_divergence(s, t, self.temperature).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((*self.pending, trainer.callback_metrics["distill/kd_loss"].item(), outputs["loss"].item()))


def lm_run(student_state, teacher_state, *, epochs=2, temperature=2.0, extra=(), ckpt_path=None, **options):
    teacher = TinyLM(width=32)
    teacher.load_state_dict(teacher_state)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    if options.get("cache"):
        options.setdefault("index_fn", sample_index)
    kd = KnowledgeDistillation(teacher, temperature=temperature, alpha=0.5, **options)
    checker = Checker(teacher, options.get("cache_top_k"), temperature)
    model = TinyLM()
    model.load_state_dict(student_state)
    torch.manual_seed(1)
    make_trainer(max_epochs=epochs, callbacks=[kd, checker, *extra]).fit(model, token_loader(), ckpt_path=ckpt_path)
    return model, kd, len(calls), checker.rows


@pytest.mark.parametrize("k", [8, VOCAB], ids=["k=8", "k=vocab"])
def test_top_k_cache_trains_reads_the_cache_in_epoch_two_and_logs_the_coarsened_kl(lm_states, k):
    model, kd, calls, rows = lm_run(*lm_states, cache="memory", cache_top_k=k)
    # the teacher ran in epoch 1, and on epoch 2's first batch to check the cache against it
    assert calls == SAMPLES // BATCH + 1 and len(rows) == 2 * SAMPLES // BATCH
    for coarse, full, logged, _ in rows:
        assert logged == pytest.approx(coarse, rel=1e-5)  # exactly the coarsened KL (float32 rounding)
        assert logged <= full * (1 + 1e-5)
        if k == VOCAB:
            assert logged == pytest.approx(full, rel=1e-5)
    if k == 8:  # 8 of 512 tokens hold most of the teacher's mass: close to the full KL, not equal
        assert all(0.9 * full < logged < full for _, full, logged, _ in rows)
    if k == VOCAB:  # the same run as with the teacher's full outputs, up to float rounding
        _, _, uncached_calls, uncached = lm_run(*lm_states)
        assert uncached_calls == len(uncached) == len(rows)
        for (_, _, logged, loss), (_, _, full_logged, full_loss) in zip(rows, uncached):
            assert logged == pytest.approx(full_logged, rel=1e-5) and loss == pytest.approx(full_loss, rel=1e-5)
    assert kd.output_cache.vocab == VOCAB and len(kd.output_cache) == SAMPLES


def tensor_bytes(shape, dtype):
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def test_disk_cache_is_atomic_reloads_its_size_is_the_shapes_and_other_settings_are_refused(
    lm_states, tmp_path, monkeypatch
):
    written = []
    real_atomic_write = cache_module.atomic_write
    monkeypatch.setattr(cache_module, "atomic_write", lambda path, write: (written.append(path), real_atomic_write(path, write)))
    top_dir, full_dir = tmp_path / "topk", tmp_path / "full"
    _, kd, calls, first = lm_run(*lm_states, epochs=1, cache="disk", cache_dir=top_dir, cache_top_k=8)
    path = top_dir / CACHE_FILE
    assert calls == SAMPLES // BATCH and written == [path] and sorted(p.name for p in top_dir.iterdir()) == [CACHE_FILE]

    positions = (SAMPLES, LENGTH)
    expected = (tensor_bytes((SAMPLES,), torch.int64) + tensor_bytes((*positions, 8), torch.float32)  # values
                + tensor_bytes((*positions, 8), torch.int16)  # indices: the vocabulary is < 32768
                + 2 * tensor_bytes(positions, torch.float32))  # log-normalizer and log-rest
    size = path.stat().st_size
    assert expected == kd.output_cache.nbytes == 10_944
    assert expected < size < expected + 1024  # + the safetensors header

    _, full_kd, _, _ = lm_run(*lm_states, epochs=1, cache="disk", cache_dir=full_dir)
    full_expected = tensor_bytes((SAMPLES,), torch.int64) + tensor_bytes((*positions, VOCAB), torch.float32)
    full_size = (full_dir / CACHE_FILE).stat().st_size
    assert full_expected == full_kd.output_cache.nbytes == kd.output_cache.full_nbytes == 393_408
    assert full_expected < full_size < full_expected + 1024
    assert "full outputs would take 0.38 MiB, 35.9x more" in kd.output_cache.report()
    print(f"\ndisk cache, {SAMPLES} samples x {LENGTH} tokens, vocab {VOCAB}: top-8 {size} B, full {full_size} B"
          f" ({full_size / size:.1f}x)")

    # A new run reads the file: one teacher forward (the check of the first hit), the same losses.
    _, _, calls, again = lm_run(*lm_states, epochs=1, cache="disk", cache_dir=top_dir, cache_top_k=8)
    assert calls == 1 and [r[2:] for r in again] == [r[2:] for r in first]

    before = path.read_bytes()
    refusals = [
        (dict(temperature=1.0, cache_top_k=8, cache_dir=top_dir), r"computed at `temperature`=2.0, but this run has `temperature`=1.0"),
        (dict(cache_top_k=16, cache_dir=top_dir), r"holds top-8 teacher outputs, but this run has `cache_top_k`=16"),
        (dict(cache_dir=top_dir), r"holds top-8 teacher outputs, but this run has `cache_top_k`=None"),
        (dict(cache_top_k=8, cache_dir=full_dir), r"holds full teacher outputs, but this run has `cache_top_k`=8"),
    ]
    for options, message in refusals:
        with pytest.raises(ValueError, match=message):
            lm_run(*lm_states, epochs=1, cache="disk", **options)
    assert path.read_bytes() == before


def test_resume_mid_run_with_a_top_k_disk_cache_is_bit_exact(lm_states, tmp_path):
    student_state, _ = lm_states

    def run(cache_dir, extra=(), ckpt_path=None):
        kd = KnowledgeDistillation(teacher="self", temperature=2.0, alpha=0.5, cache="disk", cache_dir=cache_dir,
                                   cache_top_k=8, index_fn=sample_index)
        model = TinyLM()
        model.load_state_dict(student_state)
        torch.manual_seed(1)
        make_trainer(max_epochs=3, callbacks=[kd, *extra]).fit(model, token_loader(), ckpt_path=ckpt_path)
        return model, kd

    reference, reference_kd = run(tmp_path / "a")
    checkpoint = tmp_path / "mid.ckpt"
    run(tmp_path / "b", [StopAfterEpoch(0, checkpoint)])
    state = torch.load(checkpoint, weights_only=True)["callbacks"][reference_kd.state_key]
    assert state["cache_top_k"] == 8 and len(state["teacher_fingerprint"]) == 64
    resumed, resumed_kd = run(tmp_path / "b", ckpt_path=checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed_kd.state_dict()["steps"] == reference_kd.state_dict()["steps"] == 3 * SAMPLES // BATCH

    with pytest.raises(ValueError, match=r"distilled with `cache_top_k`=8 but this callback has 4"):
        kd = KnowledgeDistillation(teacher="self", temperature=2.0, cache="memory", cache_top_k=4, index_fn=sample_index)
        make_trainer(max_epochs=3, callbacks=[kd]).fit(TinyLM(), token_loader(), ckpt_path=checkpoint)


# ---------------------------------------------------------------------- teacher="self" and checkpoints
def test_qad_recipe_fine_tuning_a_float_checkpoint_distils_from_the_checkpoints_weights(tmp_path):
    pl.seed_everything(0, verbose=False)
    float_model = RecipeMLP()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(float_model, RecipeData(samples=128))
    float_ckpt = tmp_path / "float.ckpt"
    trainer.save_checkpoint(float_ckpt)
    float_state = {k: v.clone() for k, v in float_model.state_dict().items()}

    recipe = load_recipe("qad_int4", [f"export.dirpath={tmp_path / 'packed'}"])
    callbacks = recipe.callbacks()
    kd = next(c for c in callbacks if isinstance(c, KnowledgeDistillation))
    student = RecipeMLP()  # built with other (random) weights: Lightning restores ckpt_path's after setup
    stop = StopAfterEpoch(1, tmp_path / "qad.ckpt")
    make_trainer(max_epochs=3, callbacks=[*callbacks, stop]).fit(student, RecipeData(samples=128), ckpt_path=float_ckpt)
    teacher = kd.teacher
    assert type(teacher.net[0]) is nn.Linear and not any(m._forward_pre_hooks for m in teacher.modules())
    for key, value in float_state.items():  # the float checkpoint, not the student's construction
        assert torch.equal(teacher.state_dict()[key], value), key
    assert not torch.equal(student.net[0].weight, float_state["net.0.weight"])

    # Resuming the QAD run: its teacher was the float checkpoint, which a model built from
    # scratch is not: refused, naming the fix; passing those weights as the teacher is accepted.
    def resume(teacher, **options):
        callbacks = [KnowledgeDistillation(teacher, temperature=1.0, alpha=0.5, **options),
                     *(c for c in load_recipe("qad_int4").callbacks() if isinstance(c, QuantizationAwareTraining))]
        make_trainer(max_epochs=3, callbacks=callbacks).fit(RecipeMLP(), RecipeData(samples=128),
                                                            ckpt_path=tmp_path / "qad.ckpt")
        return next(c for c in callbacks if isinstance(c, KnowledgeDistillation))

    with pytest.raises(ValueError, match=r"distilled from teacher='self' with other starting weights .* pass them as `teacher`"):
        resume("self")
    resumed = resume(str(float_ckpt), teacher_class=RecipeMLP)
    assert resumed.state_dict()["steps"] == 6  # 3 steps an epoch: epoch 1 before the stop, epoch 2 after
    # Another teacher checkpoint (a new user's trial swapped it on resume, silently), or another alpha.
    other_ckpt = tmp_path / "other.ckpt"
    pl.seed_everything(1, verbose=False)
    other = make_trainer(max_epochs=1)
    other.fit(RecipeMLP(), RecipeData(samples=128))
    other.save_checkpoint(other_ckpt)
    with pytest.raises(ValueError, match=r"distilled from a teacher with other weights than this run's `teacher`"):
        resume(str(other_ckpt), teacher_class=RecipeMLP)
    with pytest.raises(ValueError, match=r"other settings \(`alpha`: 0.5 in the checkpoint, 0.9 now\)"):
        make_trainer(max_epochs=3, callbacks=[
            KnowledgeDistillation(str(float_ckpt), teacher_class=RecipeMLP, temperature=1.0, alpha=0.9),
            *(c for c in load_recipe("qad_int4").callbacks() if isinstance(c, QuantizationAwareTraining))
        ]).fit(RecipeMLP(), RecipeData(samples=128), ckpt_path=tmp_path / "qad.ckpt")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cache_top_k=0), r"`cache_top_k` must be a positive int .* got 0"),
        (dict(cache_top_k=-3), r"`cache_top_k` must be a positive int .* got -3"),
        (dict(cache_top_k=2.5), r"`cache_top_k` must be a positive int .* got 2.5"),
        (dict(cache_top_k=True), r"`cache_top_k` must be a positive int .* got True"),
        (dict(cache_top_k="64"), r"`cache_top_k` must be a positive int .* got '64'"),
        (dict(cache=None, index_fn=None, cache_top_k=8), r"`cache_top_k` keeps the teacher's top-k logits .* set `cache`"),
        (dict(cache_top_k=8, loss="mse"), r"`cache_top_k` keeps only .* which the 'mse' loss cannot use"),
        (dict(cache_top_k=8, loss="cosine"), r"which the 'cosine' loss cannot use"),
    ],
)
def test_bad_cache_top_k_is_refused_naming_it(options, message):
    options = {"teacher": "self", "cache": "memory", "index_fn": sample_index, **options}
    with pytest.raises(ArgumentError, match=message) as caught:
        KnowledgeDistillation(**options)
    assert caught.value.argument == "cache_top_k"


def test_cache_top_k_above_the_vocabulary_and_bad_recipe_values_are_named(lm_states):
    with pytest.raises(ValueError, match=r"`cache_top_k`=513 is more than the teacher's 512 outputs per position"):
        lm_run(*lm_states, epochs=1, cache="memory", cache_top_k=VOCAB + 1)
    with pytest.raises(RecipeError, match=r"distillation.cache_top_k"):
        load_recipe({"distillation": {"teacher": "self", "cache": "memory", "index_fn": "tests.test_distill_topk.sample_index",
                                      "cache_top_k": 0}})


def test_the_cache_refuses_outputs_of_another_kind():
    cache = TeacherOutputCache(top_k=2, temperature=1.0)
    with pytest.raises(ValueError, match="keeps top-2 targets at temperature 1.0"):
        cache.store([0], torch.randn(1, 5))
    cache.store([0, 1], TopKTargets.from_logits(torch.randn(2, 5), 2, 1.0))
    with pytest.raises(ValueError, match="over 5 outputs, not 6"):
        cache.store([2], TopKTargets.from_logits(torch.randn(1, 6), 2, 1.0))
    assert cache.lookup([1, 0], (2, 5)).shape == (2, 5) and cache.lookup([3], (1, 5)) is None


def padding_mask(batch):
    """The last 3 input positions of every sequence as padding, the first 2 of sample 0 too."""
    indices, tokens = batch
    mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)
    mask[:, -3:] = False
    mask[indices == 0, :2] = False
    return mask


class MaskedChecker(Checker):
    """Checker's references over the positions ``padding_mask`` keeps, by hand."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tokens, keep = batch[1][:, :-1], padding_mask(batch)
        self.teacher.to(pl_module.device)
        with torch.no_grad():
            s, t = pl_module(tokens)[keep], self.teacher(tokens)[keep]  # [kept positions, vocab]
        coarse = brute_coarsened_kl(s, t, self.k, self.temperature) if self.k else None
        self.pending = (coarse, kl_divergence(s, t, self.temperature).item())


@pytest.mark.parametrize("options", [{}, {"cache": "memory", "cache_top_k": 8}], ids=["teacher", "top-8 cache"])
def test_mask_fn_leaves_padding_out_of_the_distillation_loss(lm_states, options, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "Checker", MaskedChecker)  # lm_run's checker: the masked references
    _, _, _, rows = lm_run(*lm_states, epochs=2, mask_fn=padding_mask, **options)
    _, _, _, unmasked = lm_run(*lm_states, epochs=1, **options)
    for coarse, full, logged, _ in rows:
        assert logged == pytest.approx(coarse if options else full, rel=1e-5)
    assert rows[0][2] != pytest.approx(unmasked[0][2], rel=1e-3)  # the padding counted before


@pytest.mark.parametrize("mask_fn, message", [
    (lambda batch: torch.ones(3, dtype=torch.bool), r"`mask_fn` must return a bool \(or 0/1 integer\) tensor of the"
     r" outputs' positions, shape \(8, 8\) for outputs of shape \(8, 8, 512\), got a torch.bool tensor of shape \(3,\)"),
    (lambda batch: torch.ones(8, 8), r"got a torch.float32 tensor"),
    (lambda batch: torch.full((8, 8), -100), r"`mask_fn` returned a torch.int64 tensor holding values other than 0 and 1"
     r" \(e.g. labels, whose -100 would count as kept\); return a bool mask"),
])
def test_a_mask_that_does_not_fit_the_outputs_is_refused(lm_states, mask_fn, message):
    with pytest.raises(ValueError, match=message):
        lm_run(*lm_states, epochs=1, mask_fn=mask_fn)


def test_a_batch_of_only_padding_distils_nothing_and_training_goes_on(lm_states):
    """An error there would stop one DDP rank alone (the others wait in the all-reduce): its
    distillation loss is 0, with a warning, and the task loss trains on."""
    with pytest.warns(UserWarning, match=r"`mask_fn` keeps no position of this batch \(only padding\?\): its"
                                         r" distillation loss is 0"):
        model, _, _, rows = lm_run(*lm_states, epochs=1, mask_fn=lambda batch: torch.zeros(8, 8, dtype=torch.bool))
    assert [logged for _, _, logged, _ in rows] == [0.0] * len(rows)
    assert all(math.isfinite(loss) and loss > 0 for *_, loss in rows)
    assert "distill/top1_agreement" not in model.trainer.callback_metrics  # not NaN: no position to agree on


def _alpha_schedule(step):
    return 0.5


def _other_alpha_schedule(step):
    return 0.9


def test_a_function_alpha_is_compared_on_resume_by_where_it_is_defined():
    """A schedule's repr names its address, which differs in every process: recorded as
    its module and name instead, so the same function resumes and another is refused."""
    import functools

    from lightning_compress.core.state import plain_setting

    assert plain_setting(_alpha_schedule) == "tests.test_distill_topk._alpha_schedule"
    assert " at 0x" not in plain_setting(functools.partial(_alpha_schedule))
    saved = {"settings": KnowledgeDistillation(nn.Linear(2, 2), alpha=_alpha_schedule)._settings()}
    KnowledgeDistillation(nn.Linear(2, 2), alpha=_alpha_schedule)._check_settings(saved)
    with pytest.raises(ValueError, match=r"`alpha`: 'tests.test_distill_topk._alpha_schedule' in the checkpoint"):
        KnowledgeDistillation(nn.Linear(2, 2), alpha=_other_alpha_schedule)._check_settings(saved)
    # Lambdas share a name ('<lambda>'): their code tells them apart, and the same code matches.
    half, most = (lambda step: 0.5), (lambda step: 0.9)
    assert plain_setting(half) != plain_setting(most) and plain_setting(half) == plain_setting(lambda step: 0.5)
    # teacher_dtype changes the distillation loss too
    saved = {"settings": KnowledgeDistillation(nn.Linear(2, 2), teacher_dtype=torch.bfloat16)._settings()}
    with pytest.raises(ValueError, match=r"`teacher_dtype`: 'torch.bfloat16' in the checkpoint, None now"):
        KnowledgeDistillation(nn.Linear(2, 2))._check_settings(saved)


def test_the_teacher_fingerprint_covers_extra_state():
    """A teacher whose state_dict holds more than tensors (get_extra_state; a dynamically
    quantized module's dtype): fingerprinted, not an AttributeError at the first save."""
    from lightning_compress.distill.cache import weights_fingerprint

    class WithExtra(nn.Linear):
        def __init__(self, tag):
            super().__init__(2, 2)
            self.tag = tag

        def get_extra_state(self):
            return {"tag": self.tag}

        def set_extra_state(self, state):
            self.tag = state["tag"]

    torch.manual_seed(0)
    first = WithExtra("a")
    second = WithExtra("b")
    second.load_state_dict({k: v for k, v in first.state_dict().items() if k != "_extra_state"}, strict=False)
    assert weights_fingerprint(first) != weights_fingerprint(second)
    second.tag = "a"
    assert weights_fingerprint(first) == weights_fingerprint(second)
