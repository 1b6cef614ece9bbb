"""Where QAT starts from (issue 19): min/max, mse, learned ranges, GPTQ and AWQ starts,
distillation from the float model, and SmoothQuant for int8 activations.

The character-level transformer of qat_accuracy.py (2 layers, d=64, standard-library
docstrings, learning rate decaying linearly over the whole run): a float base trained
``--base-steps``, then ``--extra-steps`` more either in float (the float and round-to-
nearest PTQ baselines) or with QAT from the base's weights and optimizer state. int4 and
int3 group-32 symmetric weights on every Linear; held-out perplexity, several seeds.

- PTQ points (no training) of the float model: round to nearest (RTN), GPTQ and AWQ,
  calibrated on 16 training batches.
- QAT: ``weight_range`` min/max or mse, learned ranges (from mse), ``init="gptq"`` and
  ``init="awq"``, each calibrated on the 16 batches before the QAT start; then the best
  start again with ``KnowledgeDistillation`` from the float model (quantization-aware
  distillation).
- int8 weights (channel) + int8 dynamic activations, with and without
  ``smoothing=0.5``, QAT.

AWQ and SmoothQuant fold their scales into the LayerNorm before a layer: in this model
``norm1 -> qkv``, ``norm2 -> up`` and the final ``norm -> head`` (``mappings``). The
attention output projection (its input is attention over a slice of ``qkv``'s rows) and
``down`` (after a GELU) have no such mapping, so a second QAT callback quantizes them
from min/max ranges.

Every QAT run starts at the same step, 16 steps into the resumed run, so the calibrated
starts record those 16 batches; the runs differ only in where QAT starts from.

"gap closed" is (RTN PTQ perplexity - x) / (RTN PTQ perplexity - float perplexity). Its
denominator holds the float model's own progress over those 200 steps, and the model
overfits its small corpus; qat_regimes.py measures how the figure moves with both, and
qat_finetune.py measures QAT as a fine-tune of the finished float model instead.

    python benchmarks/qat_init.py [--seeds 3]
"""

from __future__ import annotations

import copy
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from common import charlm_arguments, charlm_cache, headline, machine, quiet_trainer, save_atomically
from common import seed_summary as summary

from lightning_compress import KnowledgeDistillation, QuantizationAwareTraining, QuantSpec
from lightning_compress.examples.charlm import CharDataModule, CharTransformer, perplexity
from lightning_compress.quant import round_to_nearest
from lightning_compress.quant.calibrated_start import CalibratedStart
from lightning_compress.quant.mappings import find_mappings
from lightning_compress.quant.weights import attach_weight_quantizers

CALIBRATION_BATCHES = 16
MAPPINGS = {"norm1": ["qkv"], "norm2": ["up"], "norm": ["head"]}
MAPPED = ["qkv", "up", "head"]  # the layers AWQ/SmoothQuant scale; the rest start from min/max
UNMAPPED = ["proj", "down"]
BITS = (4, 3)
# name -> QuantizationAwareTraining options (weights and group size added per bit width)
STARTS = {
    "minmax": {},
    "mse": {"weight_range": "mse"},
    "learned (from mse)": {"weight_range": "mse", "learn_ranges": True},
    "gptq": {"init": "gptq"},
    "gptq + mse": {"init": "gptq", "weight_range": "mse"},
    "awq": {"init": "awq"},
    "awq + mse": {"init": "awq", "weight_range": "mse"},
}


def qat_callbacks(options: dict, start: int, **grid) -> list:
    """One QAT callback, or two where AWQ/SmoothQuant cover only the mapped layers."""
    options = {**grid, **options, "start_step": start}
    if options.get("init") == "awq" or options.get("smoothing") is not None:
        rest = {k: v for k, v in options.items() if k not in ("init", "smoothing")}
        return [
            QuantizationAwareTraining(**options, calibration_batches=CALIBRATION_BATCHES, mappings=MAPPINGS,
                                      targets=MAPPED, name="mapped"),
            QuantizationAwareTraining(**rest, targets=UNMAPPED, name="rest"),
        ]
    if options.get("init") is not None:
        options["calibration_batches"] = CALIBRATION_BATCHES
    return [QuantizationAwareTraining(**options)]


def ptq_point(float_model: CharTransformer, spec: QuantSpec, init: str, data: CharDataModule) -> CharTransformer:
    """The calibrated post-training model, without training: what ``init`` sets at the
    QAT start step, computed on the float model from 16 training batches."""
    model = copy.deepcopy(float_model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if init == "awq":
        mapped = {n: m for n, m in layers.items() if n.rpartition(".")[2] in MAPPED}
        rtn = {n: m for n, m in layers.items() if n not in mapped}
        for quantizer in attach_weight_quantizers(rtn, {n: spec for n in rtn}).values():
            quantizer.enabled = True
        layers = mapped
    quantizers = attach_weight_quantizers(layers, {n: spec for n in layers})
    start = CalibratedStart(model, layers, quantizers, init=init, smoothing=None,
                            mappings=find_mappings(model, MAPPINGS) if init == "awq" else ())
    model.train()
    start.start_recording()
    with torch.enable_grad():
        for index, (ids, _) in enumerate(data.train_dataloader()):
            if index == CALIBRATION_BATCHES:
                break
            model(ids)
    start.apply()
    for quantizer in quantizers.values():
        quantizer.enabled = True
    return model


class SourceDataModule(CharDataModule):
    """The char LM's windows over Python's own standard-library source (the top-level
    ``.py`` files, sorted by name, the first ``max_chars`` characters): about 4.7 MB of
    real text on disk, read, never imported, so 1400 steps see each window about once
    where the docstring corpus (about 0.33 MB) is seen about 8 times."""

    def setup(self, stage: str | None = None) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        text = "".join(path.read_text(errors="replace") for path in sorted(root.glob("*.py")))
        ids = self.vocabulary.encode(text[: self.max_chars])
        split = int(len(ids) * 0.9)
        self.train_set = self._windows(ids[:split], stride=self.context // 2)
        self.val_set = self._windows(ids[split:], stride=self.context)


CORPORA = {
    "docstrings": lambda seed: CharDataModule(seed=seed),
    "source": lambda seed: SourceDataModule(seed=seed, max_chars=3_000_000),
}


class CharLMSeed:
    """One seed: the float base (checkpointed), the float model trained on from it, and
    QAT runs branched from the base.

    The base checkpoint and the float model's weights are kept in ``cache_dir``
    (``common.charlm_cache``), keyed by the seed, the step counts, the width, the corpus,
    torch's version and the char LM's source, so the char-LM benchmarks train each seed's
    base once between them. ``corpus`` is a key of :data:`CORPORA`: the standard library's
    docstrings (the default, the benchmarks' corpus) or its source.
    """

    def __init__(self, seed: int, base_steps: int, extra_steps: int, cache_dir: Path | None = None, *,
                 d_model: int = 64, corpus: str = "docstrings") -> None:
        self.seed, self.base_steps, self.d_model = seed, base_steps, d_model
        self.total = base_steps + extra_steps
        folder = cache_dir or charlm_cache(f"seed{seed}", seed, base_steps, extra_steps, d_model, corpus,
                                           code=(CharLMSeed, _SaveAtEnd, SourceDataModule))
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = folder / "base.ckpt"
        self.data = CORPORA[corpus](seed)
        self.data.setup()
        self.val = self.data.val_dataloader()
        float_weights = folder / "float.pt"
        if not (self.checkpoint.exists() and float_weights.exists()):
            self.train(base_steps, [_SaveAtEnd(self.checkpoint)], resume=None)
            model = self.train(self.total)
            save_atomically(model.state_dict(), float_weights)
        self.float_model = self.new_model()
        self.float_model.load_state_dict(torch.load(float_weights, weights_only=True))
        self.results = {"float": perplexity(self.float_model, self.val)}

    def new_model(self) -> CharTransformer:
        pl.seed_everything(self.seed, verbose=False)
        return CharTransformer(vocab_size=len(self.data.vocabulary), d_model=self.d_model, decay_steps=self.total)

    def train(self, max_steps, callbacks=(), resume="base"):
        model = self.new_model()
        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=list(callbacks))
        trainer.fit(model, self.data, ckpt_path=self.checkpoint if resume else None)
        return model

    def ptq(self) -> None:
        for bits in BITS:
            spec = QuantSpec(bits, "group", 32)
            rtn = copy.deepcopy(self.float_model)
            round_to_nearest(rtn, spec)
            self.results[f"ptq rtn {bits}"] = perplexity(rtn, self.val)
            for init in ("gptq", "awq"):
                self.results[f"ptq {init} {bits}"] = perplexity(ptq_point(self.float_model, spec, init, self.data), self.val)

    def qat(self, name: str, options: dict, bits: int, *, distill: bool = False, **grid) -> None:
        start = self.base_steps + CALIBRATION_BATCHES
        callbacks = qat_callbacks(options, start, weights=bits, **grid)
        if distill:  # quantization-aware distillation: the float model teaches its QAT student
            callbacks.append(KnowledgeDistillation(teacher=copy.deepcopy(self.float_model), temperature=1.0, alpha=0.5))
        self.results[name] = perplexity(self.train(self.total, callbacks), self.val)


class _SaveAtEnd(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        partial = self.path.with_suffix(".partial")
        trainer.save_checkpoint(partial)
        partial.replace(self.path)  # a killed run leaves no half-written base behind


def main() -> None:
    args = charlm_arguments()

    seeds = [CharLMSeed(seed, args.base_steps, args.extra_steps) for seed in range(args.seeds)]
    for run in seeds:
        run.ptq()
        for bits in BITS:
            for name, options in STARTS.items():
                run.qat(f"qat {name} {bits}", options, bits, group_size=32)
        for name, smoothing in (("w8a8", None), ("w8a8 smoothquant", 0.5)):
            run.qat(f"qat {name}", {"activations": "int8_dynamic", "smoothing": smoothing}, 8)
    runs = [run.results for run in seeds]
    # Distillation from the float model on top of the best start at int4, at both widths.
    best = min(STARTS, key=lambda name: summary(runs, f"qat {name} 4")[0])
    for run in seeds:
        for bits in BITS:
            run.qat(f"qat {best} + KD {bits}", STARTS[best], bits, distill=True, group_size=32)

    print(f"# Where QAT starts from: char LM, mean ± sd of {args.seeds} seeds; {machine()}")
    print("| grid | start | perplexity | gap closed (vs RTN PTQ) |")
    print("|---|---|---|---|")
    float_ppl, float_sd = summary(runs, "float")
    print(f"| float | | {float_ppl:.3f} ± {float_sd:.3f} | |")
    for bits in BITS:
        rtn, _ = summary(runs, f"ptq rtn {bits}")
        rows = [(f"PTQ {init.upper()}", f"ptq {init} {bits}") for init in ("rtn", "gptq", "awq")]
        rows += [(f"QAT {name}", f"qat {name} {bits}") for name in (*STARTS, f"{best} + KD")]
        for label, key in rows:
            value, sd = summary(runs, key)
            closed = (rtn - value) / (rtn - float_ppl)
            print(f"| int{bits} g32 | {label} | {value:.3f} ± {sd:.3f} | {closed:.0%} |")
            if label.startswith("QAT") or label != "PTQ RTN":
                target = ">= 85% of the gap closed (issue 19)" if bits == 4 and label.startswith("QAT") else None
                headline("accuracy vs PTQ", f"char LM int{bits} g32 {label}: perplexity (float {float_ppl:.3f},"
                         f" RTN PTQ {rtn:.3f})", f"{value:.3f} ± {sd:.3f} (gap closed: {closed:.0%})", target)
    for name in ("w8a8", "w8a8 smoothquant"):
        value, sd = summary(runs, f"qat {name}")
        print(f"| int8 channel + int8 dynamic activations | QAT{' with smoothing=0.5' if 'smooth' in name else ''}"
              f" | {value:.3f} ± {sd:.3f} | |")
        headline("accuracy vs PTQ", f"char LM W8A8 QAT{' with SmoothQuant 0.5' if 'smooth' in name else ''}:"
                 f" perplexity (float {float_ppl:.3f})", f"{value:.3f} ± {sd:.3f}", None)
    print("Target (issue 19): QAT at int4 closes at least 85% of the RTN PTQ gap.")


if __name__ == "__main__":
    main()
