"""MagnitudePruning(score="wanda"): |W_ij| · ‖X_j‖₂ under a real Lightning Trainer on CPU."""

import pytest
import torch
import torch.utils.checkpoint
from lightning.pytorch import Callback, LightningModule
from torch import nn

from lightning_compress import IncompatibleLayersSkipped, IncompatibleSettings, MagnitudePruning
from lightning_compress.core.validate import ArgumentError
from lightning_compress.sparsity.activation_norms import InputNorms
from lightning_compress.sparsity.masks import unpack_mask
from tests.conftest import StopAfterEpoch, TinyRegressor, fit_interrupted_and_resumed, make_trainer, tiny_loader

LAYERS = ("conv", "fc1", "fc2")
LOUD = 2  # the input channel whose activations are 1000x the others', and whose conv weights are 20x smaller


def loud_loader(batches=8, batch_size=16):
    loader = tiny_loader(batches=batches, batch_size=batch_size)
    loader.dataset.tensors[0][:, LOUD] *= 1000.0
    return loader


def quiet_model():
    torch.manual_seed(0)
    model = TinyRegressor(optimizer="sgd", lr=0.0)  # the weights the update ranks are the initial ones
    with torch.no_grad():
        model.conv.weight[:, LOUD] *= 0.05
    return model


def masks_of(pruning, model):
    state = pruning.state_dict()["masks"]
    return {name: unpack_mask(state[name]["packed"], getattr(model, name).weight.shape) for name in LAYERS}


def dense_inputs(model, loader, batches):
    """Each layer's inputs over the first ``batches`` training batches, as the dense model
    computes them (float64)."""
    inputs = {name: [] for name in LAYERS}
    with torch.no_grad():
        for index, (x, _) in zip(range(batches), loader):
            h = torch.relu(model.conv(x)).flatten(1)
            inputs["conv"].append(x)
            inputs["fc1"].append(h)
            inputs["fc2"].append(torch.relu(model.fc1(h)))
    return {name: torch.cat(xs).double() for name, xs in inputs.items()}


def reference_scores(model, inputs):
    """|W|·‖X‖ per weight: Linear by input column; Conv by input channel (over batch and
    positions), the same for every kernel position."""
    scores = {}
    for name in LAYERS:
        weight, x = getattr(model, name).weight.detach().double(), inputs[name]
        if weight.dim() == 3:
            norms = x.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, 1)
        else:
            norms = x.norm(dim=0)
        scores[name] = weight.abs() * norms
    return scores


def reference_keeps(scores, sparsity, pattern, scope):
    """Keep-masks by plain sorting (ties cannot happen with these random values)."""
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        prune = torch.zeros_like(flat, dtype=torch.bool)
        prune[torch.sort(flat).indices[: round(sparsity * flat.numel())]] = True
        keeps, offset = {}, 0
        for name, s in scores.items():
            keeps[name] = ~prune[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return keeps
    keeps = {}
    for name, s in scores.items():
        if pattern == "2:4":  # the 2 largest of every 4 consecutive inputs
            groups = s.movedim(1, -1).reshape(-1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
            keeps[name] = keep.view(s.movedim(1, -1).shape).movedim(-1, 1)
        elif pattern == "structured":  # output channels by mean score (norm=1)
            channel = s.flatten(1).mean(dim=1)
            keep = torch.ones_like(channel, dtype=torch.bool)
            keep[torch.sort(channel).indices[: round(sparsity * channel.numel())]] = False
            keeps[name] = keep.view(-1, *[1] * (s.dim() - 1)).expand_as(s)
        else:
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[torch.sort(s.flatten()).indices[: round(sparsity * s.numel())]] = False
            keeps[name] = keep.view_as(s)
    return keeps


def prune_once(score, pattern, scope):
    """One-shot update at step 4 after 4 training batches (lr 0: the weights stay the initial ones)."""
    model, loader = quiet_model(), loud_loader()
    initial = {name: getattr(model, name).weight.detach().clone() for name in LAYERS}
    sparsity = None if pattern == "2:4" else 0.5
    pruning = MagnitudePruning(sparsity, schedule="one_shot", start_step=4, pattern=pattern, scope=scope, score=score)
    make_trainer(max_steps=4, callbacks=[pruning]).fit(model, loader, loud_loader(batches=2))  # validation too
    return pruning, model, initial


@pytest.mark.parametrize(
    "pattern, scope", [("unstructured", "layer"), ("unstructured", "global"), ("2:4", "layer"), ("structured", "layer")]
)
def test_wanda_masks_equal_a_sort_of_weight_times_input_norm(pattern, scope):
    pruning, model, initial = prune_once("wanda", pattern, scope)
    reference_model = quiet_model()
    scores = reference_scores(reference_model, dense_inputs(reference_model, loud_loader(), batches=4))
    expected = reference_keeps(scores, 0.5, pattern, scope)
    masks = masks_of(pruning, model)
    for name in LAYERS:
        assert torch.equal(initial[name], reference_model.get_submodule(name).weight), name  # what was ranked
        assert torch.equal(masks[name], expected[name]), name
    if pattern != "structured":  # magnitude prunes the loud channel's small weights; wanda keeps them
        loud_kept = masks["conv"][:, LOUD].float().mean()
        magnitude, magnitude_model, _ = prune_once("magnitude", pattern, scope)
        assert masks_of(magnitude, magnitude_model)["conv"][:, LOUD].float().mean() == 0.0
        assert loud_kept == 1.0


class SharedWeight(TinyRegressor):
    """fc3 holds fc1's weight (one parameter), fed other inputs than fc1: fc2's outputs."""

    def __init__(self):
        super().__init__(optimizer="sgd", lr=0.0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc3.weight = self.fc1.weight
        del self.conv

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)[:, :32])))))[:, :8]


def test_layers_sharing_a_weight_rank_it_by_the_inputs_of_both_and_keep_one_mask():
    """A new user's two Linear layers holding one weight, each with its own inputs: each
    ranked it by its own inputs and the zeros of both masks landed in the one weight
    (0.5348 sparse for a 0.5 target). Now both rank it by ``|W| · sqrt(‖X_1‖² + ‖X_3‖²)``."""
    torch.manual_seed(0)
    model = SharedWeight()
    reference = SharedWeight()
    reference.load_state_dict(model.state_dict())
    pruning = MagnitudePruning(0.5, schedule="one_shot", start_step=4, score="wanda", targets=["fc1", "fc3"])
    make_trainer(max_steps=5, callbacks=[pruning]).fit(model, loud_loader())

    with torch.no_grad():  # the inputs of the 4 batches before the update, computed by hand
        x1 = torch.cat([x.flatten(1)[:, :32] for _, (x, _) in zip(range(4), loud_loader())]).double()
        x3 = torch.relu(reference.fc2(torch.relu(reference.fc1(x1.float())))).double()
    weight = reference.fc1.weight.detach().double()
    scores = weight.abs() * (x1.square().sum(0) + x3.square().sum(0)).sqrt()
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[torch.sort(scores.flatten()).indices[: scores.numel() // 2]] = False
    state = pruning.state_dict()["masks"]
    for name in ("fc1", "fc3"):
        assert torch.equal(unpack_mask(state[name]["packed"], weight.shape), expected.view_as(weight)), name
    assert int((model.fc1.weight == 0).sum()) == weight.numel() // 2  # the one weight, at the target
    assert model.fc3.weight is model.fc1.weight or torch.equal(model.fc3.weight, model.fc1.weight)


class Fed(Callback):
    """After each training batch (after the pruning callback's batch end): the batch fed
    and the pruning state's statistics."""

    def __init__(self, pruning):
        self.pruning, self.rows = pruning, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sums = self.pruning.state_dict()["activation_norms"]["sums"]
        self.rows.append((trainer.global_step, batch[0].clone().cpu(), {k: v.clone().cpu() for k, v in sums.items()}))


def test_statistics_are_the_sum_of_squares_of_the_training_inputs_since_the_last_update():
    torch.manual_seed(0)
    pruning = MagnitudePruning(0.5, initial_sparsity=0.1, start_step=2, end_step=8, update_every=3, score="wanda")
    fed = Fed(pruning)
    # Validation (10x larger inputs) before training and after every 3 batches: not counted.
    trainer = make_trainer(max_steps=10, callbacks=[pruning, fed], val_check_interval=3)
    trainer.fit(TinyRegressor(), tiny_loader(batches=10), tiny_loader(batches=2, seed=3, scale=10.0))
    per_channel = [x.double().pow(2).sum(dim=(0, 2)) for _, x, _ in fed.rows]  # batch i ends at step i + 1
    by_step = {step: sums["conv"].double() for step, _, sums in fed.rows}
    assert torch.allclose(by_step[1], per_channel[0], rtol=1e-5)
    for update in (2, 5, 8):  # reset at each update
        assert torch.count_nonzero(by_step[update]) == 0
    assert torch.allclose(by_step[3], per_channel[2], rtol=1e-5)
    assert torch.allclose(by_step[4], per_channel[2] + per_channel[3], rtol=1e-5)  # across a validation
    assert torch.count_nonzero(by_step[9]) == 0  # past the last update: nothing collected
    assert all(sums["fc1"].shape == (64,) and sums["fc2"].shape == (32,) for _, _, sums in fed.rows)


def test_linear_statistics_of_token_inputs_and_grouped_conv_scales():
    linear, grouped = nn.Linear(6, 3), nn.Conv1d(4, 6, 3, groups=2)
    norms = InputNorms({"linear": linear, "grouped": grouped})
    norms.attach()
    x, y = torch.randn(2, 5, 6), torch.randn(2, 4, 7)
    norms.start_batch(collect=True)
    linear(x), grouped(y)
    with torch.enable_grad():  # a forward inside the backward (activation checkpointing): not counted again
        for reentrant in (False, True):
            block = lambda x: torch.relu(linear(x))  # noqa: E731
            torch.utils.checkpoint.checkpoint(block, x.requires_grad_(), use_reentrant=reentrant).sum().backward()
    norms.end_batch()
    linear(x)  # outside a training batch: not counted
    sums = norms.sums()
    assert torch.allclose(sums["linear"], 3 * x.detach().pow(2).sum(dim=(0, 1)))
    assert torch.allclose(sums["grouped"], y.pow(2).sum(dim=(0, 2)))
    scales = norms.take_scales()
    # Output channels 0-2 read input channels 0-1 (group 0), 3-5 read 2-3; over every kernel position.
    expected = torch.cat([sums["grouped"][:2].sqrt().expand(3, 2), sums["grouped"][2:].sqrt().expand(3, 2)])
    assert torch.equal(scales["grouped"].expand_as(grouped.weight), expected.unsqueeze(-1).expand(6, 2, 3))
    assert torch.count_nonzero(norms.sums()["linear"]) == 0  # taken: the next interval starts from zero
    norms.detach()
    assert not linear._forward_hooks and not grouped._forward_hooks


def _wanda():
    return MagnitudePruning(0.8, start_step=4, end_step=20, update_every=5, scope="global", score="wanda")


def test_resume_between_two_updates_is_bit_identical(tmp_path):
    reference, uninterrupted, resumed_model, resumed, ckpt = fit_interrupted_and_resumed(
        _wanda, tmp_path, epochs=3, stop_after=1
    )
    state = torch.load(ckpt, weights_only=True)["callbacks"][_wanda().state_key]
    assert state["score"] == "wanda"  # checkpointed at step 16, two batches after the update at 14
    assert all(torch.count_nonzero(sums) > 0 for sums in state["activation_norms"]["sums"].values())
    assert set(state["activation_norms"]["previous"]) == set(LAYERS)  # the norms of the update at 14
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for name, entry in uninterrupted.state_dict()["masks"].items():
        assert torch.equal(resumed.state_dict()["masks"][name]["packed"], entry["packed"]), name


def _checkpoint(tmp_path, **settings):
    ckpt = tmp_path / "a.ckpt"
    torch.manual_seed(0)
    make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, start_step=2, end_step=12, **settings),
                                          StopAfterEpoch(0, ckpt)]).fit(TinyRegressor(), tiny_loader())
    return ckpt


def _resume(ckpt, **settings):
    pruning = MagnitudePruning(0.5, start_step=2, end_step=12, **settings)
    make_trainer(max_epochs=2, callbacks=[pruning]).fit(TinyRegressor(), tiny_loader(), ckpt_path=ckpt)
    return pruning


def test_resume_with_another_score_is_refused_and_an_old_checkpoint_resumes_as_magnitude(tmp_path):
    ckpt = _checkpoint(tmp_path, score="wanda")
    with pytest.raises(ValueError, match="pruned with score 'wanda' but this .* uses `score`='magnitude'"):
        _resume(ckpt)
    old = _checkpoint(tmp_path)  # magnitude, then written as before `score` existed
    checkpoint = torch.load(old, weights_only=True)
    state = checkpoint["callbacks"][MagnitudePruning(0.5).state_key]
    del state["score"]
    torch.save(checkpoint, old)
    assert _resume(old).sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="pruned with score 'magnitude' but .* `score`='wanda'"):
        _resume(old, score="wanda")


def test_bad_score_names_the_argument_and_the_choices():
    choices = r"unknown `score` 'activation'; choose one of \('magnitude', 'wanda'\)"
    with pytest.raises(ArgumentError, match=choices) as err:
        MagnitudePruning(score="activation")
    assert err.value.argument == "score"


class Tagger(LightningModule):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        return self.fc(self.emb(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tokens():
    data = torch.utils.data.TensorDataset(torch.randint(0, 10, (32, 5)))
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_wanda_on_an_embedding_is_refused_or_skipped_by_name():
    pruning = MagnitudePruning(0.5, start_step=1, end_step=3, update_every=1, score="wanda",
                               targets=[nn.Embedding, nn.Linear])
    with pytest.raises(IncompatibleSettings, match=r"'emb' \(Embedding\): layer 'emb' cannot be ranked with"
                                                  r" score='wanda'.*add 'emb' to `exclude`, or use score='magnitude'"):
        make_trainer(callbacks=[pruning]).fit(Tagger(), _tokens())
    model = Tagger()
    skipping = MagnitudePruning(0.5, start_step=1, end_step=3, update_every=1, score="wanda",
                                targets=[nn.Embedding, nn.Linear], on_incompatible="skip")
    with pytest.warns(IncompatibleLayersSkipped, match="'emb'"):
        make_trainer(callbacks=[skipping]).fit(model, _tokens())
    assert skipping.skipped_layers.keys() == {"emb"}
    assert torch.count_nonzero(model.emb.weight) == model.emb.weight.numel()
    assert float((model.fc.weight == 0).float().mean()) == pytest.approx(0.5)


def test_attention_layers_and_their_output_projection_are_refused():
    class Attending(Tagger):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    with pytest.raises(IncompatibleSettings) as err:
        make_trainer(callbacks=[MagnitudePruning(start_step=1, score="wanda")]).fit(Attending(), _tokens())
    assert "'attn' (MultiheadAttention)" in str(err.value) and "'attn.out_proj'" in str(err.value)
    assert "output projection of an nn.MultiheadAttention" in str(err.value)


@pytest.mark.parametrize("settings", [dict(schedule="one_shot"), dict(initial_sparsity=0.2)])
def test_a_first_update_at_step_zero_is_refused(settings):
    refusal = r"`start_step`=0 puts the first update at step 0.*`start_step` >= 1"
    with pytest.raises(ArgumentError, match=refusal) as err:
        MagnitudePruning(0.5, score="wanda", **settings)
    assert err.value.argument == "start_step"
    MagnitudePruning(0.5, score="wanda")  # cubic from 0: the first update that prunes is at a later step
    late = MagnitudePruning(0.5, start_step=0.01, end_step=0.5, score="wanda", **settings)  # step 0 of 8
    trainer = make_trainer(callbacks=[late])
    with pytest.raises(ArgumentError, match=r"`start_step`=0.01 puts the first update at step 0"):
        trainer.fit(TinyRegressor(), tiny_loader())
    assert trainer.global_step == 0


class SometimesRouted(TinyRegressor):
    """``expert`` runs only on the training batches whose index in the epoch is in
    ``routed`` (a branch, or an expert of a mixture no token was routed to): some intervals
    between two mask updates have no statistics for it."""

    def __init__(self, routed):
        super().__init__(optimizer="sgd", lr=0.0)
        self.routed = set(routed)
        self.expert = nn.Linear(4, 6)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.routed:
            loss = loss + self.expert(batch[0][:, :, 0]).pow(2).mean()  # [16, 4] inputs
        return loss


class ExpertMasks(Callback):
    """The expert's mask after each training batch (after the pruning callback's update)."""

    def __init__(self, pruning):
        self.pruning, self.masks = pruning, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        entry = self.pruning.state_dict()["masks"].get("expert")
        if entry is not None:
            self.masks[trainer.global_step] = unpack_mask(entry["packed"], pl_module.expert.weight.shape)


def test_a_layer_no_forward_reached_since_the_last_update_keeps_its_previous_norms():
    torch.manual_seed(0)
    loader = tiny_loader(batches=10)
    # An update at every step from 2 to 9 (after batches 0-1, then one batch each): the
    # updates at steps 3-6 follow batches that skip the expert.
    pruning = MagnitudePruning(0.5, initial_sparsity=0.1, start_step=2, end_step=9, update_every=1,
                               score="wanda", targets=["expert"])
    recorded = ExpertMasks(pruning)
    model = SometimesRouted(routed=(0, 6, 7, 8))
    weight = model.expert.weight.detach().clone().double()  # lr=0: what every update ranks
    with pytest.warns(UserWarning, match=r"no training forward reached \['expert'\] since the last mask update"):
        make_trainer(max_steps=10, callbacks=[pruning, recorded]).fit(model, loader)
    inputs = [batch[0][:, :, 0].double() for batch in loader]

    def reference(batches, before, after):
        """``before`` (the mask so far: a pruned weight scores zero) with the weights of the
        lowest |W_ij| · ‖X_j‖₂ pruned, down to ``after``'s count."""
        scores = torch.where(before, weight.abs() * torch.cat([inputs[i] for i in batches]).norm(dim=0), -1.0)
        return scores >= scores.flatten().sort().values[int((~after).sum())]

    counts = [int((~recorded.masks[step]).sum()) for step in range(2, 8)]
    assert counts == sorted(counts) and len(set(counts)) == 6  # a weight more pruned at each of these updates
    other_norms_differ = []
    for step in range(2, 8):  # batch 0 is the last the expert saw before the updates at steps 2-6
        before = recorded.masks.get(step - 1, torch.ones_like(weight, dtype=torch.bool))
        seen = [0] if step <= 6 else [6]
        assert torch.equal(recorded.masks[step], reference(seen, before, recorded.masks[step])), step
        # What ranking by the inputs of the batch before (had the expert seen it) would prune.
        other_norms_differ.append(not torch.equal(recorded.masks[step], reference([step - 1], before, recorded.masks[step])))
    assert any(other_norms_differ[1:5])  # the check above tells the norms apart


def test_resume_between_two_updates_without_statistics_is_bit_identical(tmp_path):
    """Checkpointed after a stale update at step 3 (batch 2 skips the expert), resumed
    into another (batch 0 of the next epoch skips it too): the norms of the update at step 2
    come back from the checkpoint."""

    def run(extra=(), ckpt_path=None):
        torch.manual_seed(0)
        model = SometimesRouted(routed=(1,))
        pruning = MagnitudePruning(0.5, initial_sparsity=0.1, start_step=2, end_step=8, update_every=1,
                                   score="wanda", targets=["expert"])
        recorded = ExpertMasks(pruning)
        with pytest.warns(UserWarning, match="no training forward reached"):
            make_trainer(max_epochs=3, callbacks=[pruning, recorded, *extra]).fit(
                model, tiny_loader(batches=3), ckpt_path=ckpt_path)
        return recorded.masks, pruning

    uninterrupted, _ = run()
    checkpoint = tmp_path / "epoch0.ckpt"
    run([StopAfterEpoch(0, checkpoint)])
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][MagnitudePruning(0.5).state_key]["activation_norms"]
    assert saved["previous"]["expert"].count_nonzero() == 4 and saved["sums"]["expert"].count_nonzero() == 0
    resumed, _ = run(ckpt_path=checkpoint)
    assert set(resumed) == {4, 5, 6, 7, 8, 9}
    for step, mask in resumed.items():
        assert torch.equal(mask, uninterrupted[step]), step
    assert not torch.equal(uninterrupted[4], uninterrupted[3])  # the update at step 4 pruned more


def test_wanda_statistics_of_a_checkpoint_written_before_the_last_norms_were_kept_load():
    layer = nn.Linear(3, 2)
    norms = InputNorms({"fc": layer})
    norms.load({"fc": torch.tensor([1.0, 4.0, 9.0])})  # the totals alone, as earlier checkpoints hold them
    assert torch.equal(norms.take_scales()["fc"], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"cover \['other'\] but this MagnitudePruning ranks \['fc'\]"):
        norms.load({"sums": {"other": torch.ones(3)}, "previous": {}})
    with pytest.raises(ValueError, match=r"cover \['fc', 'other'\] but"):
        norms.load({"sums": {"fc": torch.ones(3)}, "previous": {"other": torch.ones(3)}})
    with pytest.raises(ValueError, match="statistics of layer 'fc' do not fit its input size"):
        norms.load({"sums": {"fc": torch.ones(3)}, "previous": {"fc": torch.ones(4)}})
    with pytest.raises(ValueError, match=r"cover \{'sums': 3\} but"):
        norms.load({"sums": 3})
    with pytest.raises(ValueError, match=r"cover \{'sums': None\} but"):
        norms.load(None)


def test_an_update_without_statistics_names_the_layer():
    class Unused(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(8, 8)  # never called by training_step

    pruning = MagnitudePruning(0.5, start_step=2, end_step=4, update_every=1, score="wanda")
    with pytest.raises(ValueError, match=r"no activation statistics for \['spare'\]"):
        make_trainer(callbacks=[pruning]).fit(Unused(), tiny_loader())
