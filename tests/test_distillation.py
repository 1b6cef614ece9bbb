"""KnowledgeDistillation: loss numerics, and the callback under a real Lightning Trainer on CPU."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.callbacks.distillation import CACHE_FILE, KnowledgeDistillation
from lightning_compress.distill import losses
from lightning_compress.distill.cache import weights_fingerprint
from tests.conftest import StopAfterEpoch, TinyRegressor, fit_interrupted_and_resumed, make_trainer, tiny_loader
from tests.ddp_process import run_script

SCRIPT = Path(__file__).parent / "scripts" / "ddp_distill.py"


class WideTeacher(nn.Module):
    """A plain nn.Module teacher, wider than TinyRegressor (fc1: 48 vs 32 features)."""

    def __init__(self, classes: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class CallsItsNetwork(TinyRegressor):
    """A training_step that calls its network directly (as ``self.model(**batch).loss``
    does for a transformers model), never the LightningModule's forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def test_a_training_step_that_never_calls_forward_names_student_layer_and_teacher_inputs(seeded):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(32, 8))
    with pytest.raises(RuntimeError, match=r"saw no call of the LightningModule's forward in this training_step;.*"
                       r"set `student_layer` to the module that computes the outputs \(e\.g\. 'model' for a"
                       r" training_step that calls self\.model\(\*\*batch\)\);.*needs `teacher_inputs`"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher=teacher)]).fit(CallsItsNetwork(),
                                                                                          tiny_loader())
    # Naming the module that computes the outputs distils them: the teacher gets its inputs.
    trainer = make_trainer(max_steps=2, callbacks=[KnowledgeDistillation(teacher=teacher, student_layer="net")])
    trainer.fit(CallsItsNetwork(), tiny_loader())
    assert math.isfinite(float(trainer.callback_metrics["distill/kd_loss"]))


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- numerics
STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, -1.0]])


@pytest.mark.parametrize(
    "name, expected",
    [
        # T=2: 4 * mean_rows sum_c p_t (log p_t - log p_s), p = softmax(logits / 2)
        ("kl", 0.6862707683698127),
        ("reverse_kl", 0.729431927769774),
        # squares 1, 1, .25, .25, 2.25, 4 -> 8.75 / 6
        ("mse", 1.4583333333333333),
        # 1 - cos: row 0 = 1 - 4 / (sqrt(5.25) sqrt(5)), row 1 = 1 + 1.5 / (sqrt(2) sqrt(1.5))
        ("cosine", 1.042652672712806),
    ],
)
def test_each_loss_equals_the_hand_computed_value(name, expected):
    value = losses.distillation_loss(name, STUDENT, TEACHER, temperature=2.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # [..., C]: leading dimensions are positions, averaged like the batch.
    as_tokens = losses.distillation_loss(name, STUDENT[:, None], TEACHER[:, None], temperature=2.0)
    assert as_tokens.item() == pytest.approx(expected, rel=1e-6)


def hand_kl(student, teacher, temperature):
    """``T**2 * mean_rows sum_c p_t (log p_t - log p_s)``, p = softmax(logits / T), computed
    in plain float64 Python (not with the library's loss)."""
    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    rows = []
    for s_row, t_row in zip(student.double().reshape(-1, student.shape[-1]).tolist(),
                            teacher.double().reshape(-1, teacher.shape[-1]).tolist()):
        p_s, p_t = softmax(s_row), softmax(t_row)
        rows.append(sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t)))
    return temperature**2 * sum(rows) / len(rows)


def hand_agreement(student, teacher):
    """Fraction of rows whose largest entry sits at the same position, in plain Python."""
    s_rows, t_rows = student.reshape(-1, student.shape[-1]).tolist(), teacher.reshape(-1, teacher.shape[-1]).tolist()
    same = [s.index(max(s)) == t.index(max(t)) for s, t in zip(s_rows, t_rows)]
    return sum(same) / len(same)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_carries_the_temperature_squared_factor_and_agreement_counts_argmax(temperature):
    got = losses.kl_divergence(STUDENT, TEACHER, temperature).item()
    # hand_kl multiplies by T**2: at T = 2 and 4 a missing (or doubled) factor fails here.
    assert got == pytest.approx(hand_kl(STUDENT, TEACHER, temperature), rel=1e-6)
    assert losses.kl_divergence(STUDENT, STUDENT.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.top1_agreement(STUDENT, TEACHER).item() == 0.0  # argmax 1 vs 0, 2 vs 0
    assert losses.top1_agreement(STUDENT, STUDENT * 2).item() == 1.0


# ---------------------------------------------------------------------- callback
class GradientWatcher(Callback):
    def __init__(self, kd):
        self.kd = kd
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert all(p.grad is not None for p in pl_module.parameters())
        assert all(p.grad is None for p in self.kd.teacher.parameters())
        teacher_ids = {id(p) for p in self.kd.teacher.parameters()}
        assert not any(id(p) in teacher_ids for g in optimizer.param_groups for p in g["params"])
        assert self.kd.teacher.training is False
        self.checked += 1


def test_teacher_stays_frozen_and_out_of_the_checkpoint(tmp_path, seeded):
    teacher = WideTeacher()
    before = clone_state(teacher)
    kd = KnowledgeDistillation(teacher, features=[("fc1", "fc1")])
    watcher = GradientWatcher(kd)
    model = TinyRegressor()
    trainer = make_trainer(max_epochs=2, callbacks=[kd, watcher])
    trainer.fit(model, tiny_loader(batches=4))
    assert watcher.checked == 8
    assert_same_state(clone_state(teacher), before)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert "training_step" not in model.__dict__  # the user's method is back
    assert not model._forward_hooks and not model._forward_pre_hooks
    # The projection trained with its own optimizer.
    assert kd.state_dict()["projections"]["0"]["weight"].shape == (48, 32)

    trainer.save_checkpoint(tmp_path / "student.ckpt")
    checkpoint = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(TinyRegressor().state_dict())
    state = checkpoint["callbacks"][kd.state_key]
    assert set(state) == {"version", "features", "steps", "settings", "projections", "projection_optimizer",
                          "teacher_fingerprint"}
    assert state["teacher_fingerprint"] == weights_fingerprint(teacher)  # its SHA-256, never its weights
    assert state["settings"] == {"temperature": 4.0, "alpha": 0.5, "loss": "kl", "student_layer": None,
                                 "feature_weight": 1.0, "teacher_dtype": None}
    saved = [t for entry in state["projections"].values() for t in entry.values()]
    teacher_tensors = list(teacher.state_dict().values())
    for tensor in saved + [t for t in checkpoint["state_dict"].values()]:
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in teacher_tensors)
    assert len(checkpoint["optimizer_states"][0]["param_groups"][0]["params"]) == len(list(model.parameters()))


class DictRegressor(TinyRegressor):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "extra": 1}


class LossChecker(Callback):
    """Recomputes alpha * task + (1 - alpha) * kd with the pre-step weights."""

    def __init__(self, teacher, alpha, temperature):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.expected, self.checked = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            out = pl_module(x)
            task = torch.nn.functional.mse_loss(out, y).cpu()
            teacher_out = self.teacher(x)
            kd = torch.tensor(hand_kl(out, teacher_out, self.temperature), dtype=torch.float32)
        alpha = self.alpha(trainer.global_step) if callable(self.alpha) else self.alpha
        self.expected = (alpha * task + (1 - alpha) * kd, task, kd, alpha, hand_agreement(out, teacher_out))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        total, task, kd, alpha, agreement = self.expected
        # A small KL (~1e-3) is a difference of nearly equal float32 sums: its relative
        # error follows the threads' reduction order (2.4e-5 with 2 threads, against the
        # float64 hand computation); a wrong weighting or temperature is off by far more.
        torch.testing.assert_close(outputs["loss"].cpu(), total, rtol=1e-4, atol=1e-7)
        logged = trainer.callback_metrics
        torch.testing.assert_close(logged["distill/task_loss"].cpu(), task, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logged["distill/kd_loss"].cpu(), kd, rtol=1e-4, atol=1e-7)
        assert logged["distill/alpha"].item() == pytest.approx(alpha)
        assert logged["distill/top1_agreement"].item() == pytest.approx(agreement, abs=1e-6)
        self.checked += 1


@pytest.mark.parametrize(
    "module_class, alpha",
    [(TinyRegressor, 0.3), (DictRegressor, 0.3), (TinyRegressor, lambda step: 0.2 if step < 4 else 0.9)],
    ids=["tensor", "dict", "alpha-schedule"],
)
def test_optimized_loss_is_the_alpha_weighted_sum(module_class, alpha, seeded):
    teacher = WideTeacher()
    kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=alpha)
    checker = LossChecker(teacher, alpha, 2.0)
    make_trainer(max_epochs=2, callbacks=[kd, checker]).fit(module_class(), tiny_loader(batches=4))
    assert checker.checked == 8


def _stacked_run(order, teacher_state, initial, teacher="model"):
    if teacher == "model":
        teacher = WideTeacher()
        teacher.load_state_dict(teacher_state)
    callbacks = {
        "kd": KnowledgeDistillation(teacher, alpha=0.5),
        "prune": MagnitudePruning(0.5, start_step=0, end_step=6, update_every=2),
        "qat": QuantizationAwareTraining("int4", group_size=4, start_step=2, activations="int8_dynamic"),
    }
    model = TinyRegressor()
    model.load_state_dict(initial)
    make_trainer(max_epochs=2, callbacks=[callbacks[name] for name in order]).fit(model, tiny_loader(batches=4))
    return model, callbacks["kd"]


def test_stacked_with_pruning_and_qat_in_either_order_gives_the_same_student():
    torch.manual_seed(0)
    teacher_state, initial = clone_state(WideTeacher()), clone_state(TinyRegressor())
    first, _ = _stacked_run(["kd", "prune", "qat"], teacher_state, initial)
    second, _ = _stacked_run(["qat", "prune", "kd"], teacher_state, initial)
    assert_same_state(clone_state(first), clone_state(second))
    assert float((first.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("order", [["kd", "prune", "qat"], ["qat", "prune", "kd"]], ids=["kd-first", "kd-last"])
def test_self_teacher_is_the_students_starting_float_weights(order):
    torch.manual_seed(0)
    initial = clone_state(TinyRegressor())
    plain = TinyRegressor()
    plain.load_state_dict(initial)
    student, kd = _stacked_run(order, None, initial, teacher="self")
    teacher = kd.teacher
    assert teacher is not student and type(teacher.fc1) is nn.Linear  # no transform came along
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in teacher.modules())
    assert_same_state(clone_state(teacher), initial)
    x = torch.randn(16, 4, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), plain(x))
        assert not torch.equal(student(x), plain(x))  # the student did move (and is quantized)


def test_teacher_from_a_checkpoint_path_is_loaded_without_unpickling(tmp_path, seeded, monkeypatch):
    saved = TinyRegressor(lr=0.05)
    trainer = make_trainer(max_steps=3)
    trainer.fit(saved, tiny_loader(batches=4))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((Path(args[0]) if args else None, kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    kd = KnowledgeDistillation(str(path), teacher_class=TinyRegressor)
    make_trainer(max_steps=2, callbacks=[kd]).fit(TinyRegressor(), tiny_loader(batches=4))
    assert (path, True) in calls and all(w is True for p, w in calls if p == path)
    assert isinstance(kd.teacher, TinyRegressor) and kd.teacher.hparams.lr == 0.05
    x = torch.randn(8, 4, 8)
    with torch.no_grad():
        assert torch.equal(kd.teacher(x), saved(x))


def _resume_kd():
    return KnowledgeDistillation(WideTeacher(), features=[("fc1", "fc1")], projection_lr=1e-2, alpha=0.5)


def test_resume_is_bit_identical_for_student_and_projections(tmp_path):
    teacher_state = clone_state(WideTeacher())

    def make_kd():
        kd = _resume_kd()
        kd.config.teacher.load_state_dict(teacher_state)
        return kd

    reference, uninterrupted, resumed, kd, ckpt = fit_interrupted_and_resumed(
        make_kd, tmp_path, epochs=3, stop_after=0, batches=4
    )
    assert torch.load(ckpt, weights_only=True)["callbacks"][_resume_kd().state_key]["projections"]

    assert_same_state(clone_state(resumed), clone_state(reference))
    a, b = kd.state_dict(), uninterrupted.state_dict()
    assert a["steps"] == b["steps"] == 12
    assert_same_state(a["projections"]["0"], b["projections"]["0"])
    for key, value in b["projection_optimizer"]["state"][0].items():
        assert torch.equal(a["projection_optimizer"]["state"][0][key], value), key


class ManualRegressor(TinyRegressor):
    def __init__(self, forget: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.forget = forget

    def training_step(self, batch, batch_idx):
        kd = next(c for c in self.trainer.callbacks if isinstance(c, KnowledgeDistillation))
        optimizer = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if not self.forget:
            loss = kd.task_weight * loss + kd.loss
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_trains_with_kd_loss_and_forgetting_it_fails(seeded):
    teacher = WideTeacher()
    model = ManualRegressor()
    before = clone_state(model)
    trainer = make_trainer(max_epochs=1, callbacks=[KnowledgeDistillation(teacher, alpha=0.0)])
    trainer.fit(model, tiny_loader(batches=4))
    assert trainer.global_step == 4
    assert trainer.callback_metrics["distill/kd_loss"] > 0
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])

    forgetful = ManualRegressor(forget=True)
    with pytest.raises(RuntimeError, match=r"did not read `kd.loss`.*before manual_backward"):
        make_trainer(callbacks=[KnowledgeDistillation(teacher)]).fit(forgetful, tiny_loader(batches=4))
    assert "training_step" not in forgetful.__dict__


class IndexedRegressor(TinyRegressor):
    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


def indexed_loader():
    x, y = tiny_loader(batches=4).dataset.tensors
    dataset = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=16)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].clone())


def _cached_run(teacher_state, initial, **options):
    teacher = WideTeacher()
    teacher.load_state_dict(teacher_state)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    kd = KnowledgeDistillation(teacher, teacher_inputs=lambda batch: batch[1], **options)
    recorder = LossRecorder()
    model = IndexedRegressor()
    model.load_state_dict(initial)
    make_trainer(max_epochs=2, callbacks=[kd, recorder]).fit(model, indexed_loader())
    return len(calls), recorder.losses


@pytest.fixture(scope="module")
def uncached():
    torch.manual_seed(0)
    teacher_state, initial = clone_state(WideTeacher()), clone_state(TinyRegressor())
    calls, losses_ = _cached_run(teacher_state, initial)
    assert calls == 8 and len(losses_) == 8
    return teacher_state, initial, losses_


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_teacher_runs_in_the_first_epoch_only_and_gives_the_same_losses(tmp_path, cache, uncached):
    teacher_state, initial, uncached = uncached
    options = dict(cache=cache, index_fn=lambda batch: batch[0])
    if cache == "disk":
        options["cache_dir"] = tmp_path
    calls, cached = _cached_run(teacher_state, initial, **options)
    assert calls == 4 + 1  # epoch 1, and epoch 2's first batch: the check of the fit's first full hit
    assert len(cached) == 8 and all(torch.equal(a, b) for a, b in zip(cached, uncached))
    if cache == "disk":
        assert (tmp_path / CACHE_FILE).is_file()
        calls, again = _cached_run(teacher_state, initial, **options)  # a new run reads the file
        assert calls == 1 and all(torch.equal(a, b) for a, b in zip(again, uncached))


@pytest.mark.parametrize("index_fn, message", [
    (lambda batch: batch[0] * 0, r"`index_fn` returned indices \[0\] more than once in one batch"),
    (lambda batch: batch[0].float(), r"`index_fn` must return integer sample indices .* torch.float32"),
    (lambda batch: batch[0] > 3, r"`index_fn` must return integer sample indices .* torch.bool"),
    (lambda batch: "all", r"`index_fn` must return the batch's integer sample indices; it returned 'all'"),
])
def test_cache_index_fn_that_cannot_tell_samples_apart_is_refused(uncached, index_fn, message):
    # A repeated index read one sample's cached teacher outputs for every sample of the
    # batch, silently (a new user's trial: the KD loss stopped following training).
    teacher_state, initial, _ = uncached
    with pytest.raises(ValueError, match=message):
        _cached_run(teacher_state, initial, cache="memory", index_fn=index_fn)


def test_ddp_teacher_is_not_wrapped_and_ranks_agree(tmp_path):
    run_script(SCRIPT, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["checked"] and rank1["checked"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert_same_state(rank0["weights"], rank1["weights"])
    assert_same_state(rank0["callback"]["projections"]["0"], rank1["callback"]["projections"]["0"])
    assert_same_state(rank0["teacher"], rank1["teacher"])


@pytest.mark.parametrize("scenario, cause", [
    ("refused", "does not hold this teacher's outputs"),  # rank 0 reads another teacher's cache; rank 1 has none
    ("index-fn", "`index_fn` must return integer sample indices"),  # rank 1's indices are floats
    ("truncated", "cannot be read"),  # rank 1's file is cut short: refused in on_fit_start
])
def test_ddp_a_cache_error_on_one_rank_stops_every_rank_at_once(ddp_cache_errors, scenario, cause):
    # The other rank used to wait in the gradient all-reduce (or a barrier) for a rank that had
    # left: a hang under NCCL, a lost-connection error under gloo.
    failed = 0 if scenario == "refused" else 1
    errors = {rank: (ddp_cache_errors / f"rank{rank}-{scenario}.txt").read_text() for rank in range(2)}
    assert errors[failed].startswith("ValueError: ") and cause in errors[failed]
    assert errors[1 - failed] == (
        f"ValueError: KnowledgeDistillation: the teacher or its output cache failed on rank {failed} in this step (that"
        " rank's error names the cause and the fix), so every rank stops here rather than wait")


@pytest.fixture(scope="module")
def ddp_cache_errors(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_cache_errors")
    run_script(SCRIPT, out_dir, "cache-errors")
    assert not list(out_dir.glob("*-written.txt"))  # the first fit, which writes the caches, trains
    return out_dir


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), r"`teacher` is required"),
        (dict(teacher=3), r"`teacher` must be a model, a checkpoint path or 'self'"),
        (dict(teacher="missing.ckpt", teacher_class=TinyRegressor), r"`teacher` checkpoint path 'missing.ckpt' does not exist"),
        (dict(teacher="self", teacher_class=TinyRegressor), r"`teacher_class` is only used when `teacher` is a checkpoint path"),
        (dict(temperature=0), r"`temperature` must be a positive number"),
        (dict(temperature="4"), r"`temperature` must be a positive number"),
        (dict(alpha=1.5), r"`alpha` must be a float in \[0, 1\]"),
        (dict(alpha=-0.1), r"`alpha` must be a float in \[0, 1\]"),
        (dict(loss="kld"), r"unknown `loss` 'kld'; choose one of \('kl', 'reverse_kl', 'mse', 'cosine'\)"),
        (dict(features=["fc1"]), r"`features` entries must be \(student layer, teacher layer\) pairs"),
        (dict(features=[("fc1", 2)]), r"`features` entries must be \(student layer, teacher layer\) pairs"),
        (dict(features="fc1"), r"`features` must be a list of \(student layer, teacher layer\) name pairs"),
        (dict(cache="redis", index_fn=lambda b: b[0]), r"unknown `cache` 'redis'; choose None or one of"),
        (dict(cache="memory"), r"`cache`='memory' needs `index_fn`"),
        (dict(cache="disk", index_fn=lambda b: b[0]), r"`cache`='disk' needs `cache_dir`"),
        (dict(index_fn=lambda b: b[0]), r"`index_fn` .* is only used with `cache`"),
        (dict(cache="memory", index_fn=128), r"`index_fn` must be a callable batch -> sample indices .* got int 128"),
        (dict(features=[("fc1", "fc1")], cache="memory", index_fn=lambda b: b[0]), r"`features` cannot be combined with `cache`"),
        (dict(teacher_dtype=torch.int8), r"`teacher_dtype` must be a floating torch dtype"),
        (dict(teacher_strategy="shard"), r"unknown `teacher_strategy` 'shard'; choose one of \('replicate', 'fsdp2'\)"),
        (dict(mask_fn="attention_mask"), r"`mask_fn` must be a callable batch -> bool tensor of the output positions"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message):
    kwargs = {"teacher": WideTeacher(), **kwargs} if "teacher" not in kwargs and kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**kwargs)


def test_checkpoint_path_without_class_is_refused(tmp_path):
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"`teacher` is a checkpoint path .* also pass `teacher_class=`"):
        KnowledgeDistillation(str(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(teacher=WideTeacher(classes=5)), r"teacher output shape \(16, 5\) differs from the student output shape \(16, 8\)"),
        (dict(teacher=WideTeacher(), features=[("fc_1", "fc1")]), r"`features` layer 'fc_1' does not exist in the student .* Close names: fc1"),
        (dict(teacher=WideTeacher(), features=[("fc1", "fc3")]), r"`features` layer 'fc3' does not exist in the teacher .* Close names: .*fc1"),
        (dict(teacher=WideTeacher(), student_layer="fc9"), r"`student_layer` layer 'fc9' does not exist .* Close names: .*fc1"),
        (dict(teacher=WideTeacher(), alpha=lambda step: 1.5), r"the `alpha` schedule returned 1.5 at step 0"),
        (dict(teacher=WideTeacher(), teacher_strategy="fsdp2"),
         r"`teacher_strategy`='fsdp2' shards the teacher over ModelParallelStrategy's device mesh, but this Trainer"
         r" uses SingleDeviceStrategy; use teacher_strategy='replicate'"),
        (dict(teacher="self", student_layer="fc2", teacher_strategy="fsdp2"),
         r"`teacher_strategy`='fsdp2' shards the teacher"),
    ],
)
def test_setup_and_first_batch_errors_name_the_problem(kwargs, message, seeded):
    model = TinyRegressor()
    with pytest.raises(ValueError, match=message):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(**kwargs)]).fit(model, tiny_loader(batches=2))
    assert "training_step" not in model.__dict__ and not model._forward_hooks


def test_teacher_output_cache_grows_gathers_in_order_and_round_trips(tmp_path):
    from lightning_compress.distill.cache import TeacherOutputCache

    cache = TeacherOutputCache()
    first = torch.arange(6.0).view(3, 2)
    cache.store([10, 3, 7], first)
    assert cache.lookup([7, 10], (2, 2)).tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert cache.lookup([7, 99], (2, 2)) is None  # any missing sample means: run the teacher
    cache.store(list(range(100, 120)), torch.ones(20, 2))  # beyond the initial capacity
    assert len(cache) == 23 and cache.lookup([3, 119], (2, 2)).tolist() == [[2.0, 3.0], [1.0, 1.0]]
    cache.save(tmp_path / "c.safetensors")
    loaded = TeacherOutputCache.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded.lookup([3, 10, 119], (3, 2)), cache.lookup([3, 10, 119], (3, 2)))


# ---------------------------------------------------------------------- review fixes
def test_a_bf16_true_student_distils_from_a_float32_teacher(seeded):
    teacher = WideTeacher()
    kd = KnowledgeDistillation(teacher=teacher)
    make_trainer(max_epochs=1, precision="bf16-true", callbacks=[kd]).fit(TinyRegressor(), tiny_loader(batches=2))
    assert next(teacher.parameters()).dtype == torch.float32


def test_one_distillation_callback_per_model(seeded):
    callbacks = [KnowledgeDistillation(teacher=WideTeacher()), KnowledgeDistillation(teacher=WideTeacher(), name="b")]
    model = TinyRegressor()
    with pytest.raises(ValueError, match="another KnowledgeDistillation already distils this model"):
        make_trainer(callbacks=callbacks).fit(model, tiny_loader(batches=2))
    assert "training_step" not in model.__dict__  # the first wrapper was removed on the error


def test_a_teacher_that_shares_a_layer_with_the_student_is_refused(seeded):
    model, teacher = TinyRegressor(), WideTeacher()
    teacher.conv = model.conv
    with pytest.raises(ValueError, match="shares parameters with the student"):
        make_trainer(callbacks=[KnowledgeDistillation(teacher=teacher)]).fit(model, tiny_loader(batches=2))
    assert model.conv.weight.requires_grad


class InplaceAfterLayer(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)  # modifies conv's output in place
        return self.fc2(torch.relu(self.fc1(h)))


def test_a_student_output_modified_in_place_is_an_error_not_a_wrong_loss(seeded):
    kd = KnowledgeDistillation(teacher="self", student_layer="conv", loss="mse")
    with pytest.raises(RuntimeError, match="modified in place"):
        make_trainer(callbacks=[kd]).fit(InplaceAfterLayer(), tiny_loader(batches=2))


def test_reading_kd_loss_under_automatic_optimization_is_refused(seeded):
    class Reads(TinyRegressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.trainer.callbacks[0].loss

    with pytest.raises(RuntimeError, match="counts it twice"):
        make_trainer(callbacks=[KnowledgeDistillation(teacher=WideTeacher())]).fit(Reads(), tiny_loader(batches=2))


def test_state_keeps_counting_after_a_resume_without_features(tmp_path, seeded):
    ckpt = tmp_path / "a.ckpt"
    teacher = WideTeacher()
    make_trainer(max_epochs=3, callbacks=[KnowledgeDistillation(teacher=teacher), StopAfterEpoch(0, ckpt)]).fit(
        TinyRegressor(), tiny_loader(batches=4)
    )
    kd = KnowledgeDistillation(teacher=teacher)
    make_trainer(max_epochs=3, callbacks=[kd]).fit(TinyRegressor(), tiny_loader(batches=4), ckpt_path=ckpt)
    assert kd.state_dict()["steps"] == 12


def test_side_optimizers_refuse_fp16_loss_scaling():
    from types import SimpleNamespace

    from lightning_compress.core.side_optimizer import SideOptimizer

    trainer = SimpleNamespace(precision="16-mixed", optimizers=[torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)])
    with pytest.raises(ValueError, match="`learn_ranges` trains parameters outside your optimizer.*bf16-mixed"):
        SideOptimizer(1e-3).follow(trainer, "`learn_ranges`")


class BatchForward(TinyRegressor):
    """forward(batch): the student takes the whole batch, which the teacher cannot."""

    def forward(self, batch):
        x = batch["x"] if isinstance(batch, dict) else batch
        return super().forward(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch), batch["y"])


def _dict_loader():
    x, y = tiny_loader(batches=2).dataset.tensors
    return torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=16)


def test_a_teacher_that_cannot_take_the_students_inputs_is_told_about_teacher_inputs(seeded):
    kd = KnowledgeDistillation(teacher=TinyRegressor(), temperature=1.0, alpha=0.5)
    with pytest.raises((TypeError, AttributeError)) as error:
        make_trainer(max_steps=1, callbacks=[kd]).fit(BatchForward(), _dict_loader())
    note = " ".join(getattr(error.value, "__notes__", ()))
    assert "the teacher (TinyRegressor) was called with (dict)" in note and "teacher_inputs=" in note
    kd = KnowledgeDistillation(teacher=TinyRegressor(), temperature=1.0, alpha=0.5, teacher_inputs=lambda b: b["x"])
    make_trainer(max_steps=1, callbacks=[kd]).fit(BatchForward(), _dict_loader())  # the fix it names
