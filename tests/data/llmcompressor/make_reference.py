"""Write what llm-compressor saves for the tiny LLaMA of tests/test_compressed_tensors_vllm.py.

llm-compressor pins other transformers/compressed-tensors versions than this project, so it
runs in a scratch environment, never in .venv; its output is kept here as data (the
config.json, and each tensor's dtype, shape and SHA-256), which the tests compare our
export with. Regenerate (from the repository root; nothing is downloaded but the wheels):

    .venv/bin/pip install --no-deps --target /tmp/llmc_site llmcompressor==0.14.0.1 \\
        compressed-tensors==0.19.0 transformers==5.17.0 huggingface_hub==1.33.0 auto-round==0.15.1 \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nvidia-ml-py pandas pillow py-cpuinfo pyarrow \\
        python-dateutil tzdata
    PYTHONPATH=/tmp/llmc_site .venv/bin/python tests/data/llmcompressor/make_reference.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

HERE = Path(__file__).resolve().parent
W8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
# Presets by name; the two schemes our activation QAT trains (asymmetric int8 inputs) as config groups.
SCHEMES = {
    "W4A16": "W4A16",
    "W4A16_ASYM": "W4A16_ASYM",
    "W8A16": "W8A16",
    "W8A8": "W8A8",
    "W8A8_ASYM_TOKEN": {"targets": ["Linear"], "weights": W8, "input_activations": {
        "num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}},
    "W8A8_ASYM_STATIC": {"targets": ["Linear"], "weights": W8, "input_activations": {
        "num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False}},
}


def tiny_llama() -> torch.nn.Module:
    """The float model both tools quantize (the test builds the same one)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def state_sha256(tensors) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensor_sha256(tensors[name]).encode())
    return digest.hexdigest()


def main(names) -> None:
    import compressed_tensors
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models

    for name in names:
        with tempfile.TemporaryDirectory() as work:
            float_dir, out = Path(work) / "float", Path(work) / "out"
            tiny_llama().save_pretrained(float_dir)
            model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
            float_sha = state_sha256(model.state_dict())
            scheme = SCHEMES[name]
            if isinstance(scheme, str):
                modifier = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
            else:
                modifier = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
            kwargs = {}
            if "STATIC" in name:  # static input ranges are calibrated on a few random sequences
                ids = torch.randint(1, 100, (8, 12), generator=torch.Generator().manual_seed(0))
                samples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]
                vocabulary = models.WordLevel({str(i): i for i in range(100)}, unk_token="0")
                kwargs = {"dataset": torch.utils.data.DataLoader(samples, batch_size=None),
                          "processor": transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocabulary))}
            oneshot(model=model, recipe=modifier, **kwargs)
            model.save_pretrained(out, save_compressed=True)
            tensors = load_file(out / "model.safetensors")
            reference = {
                "scheme": scheme,
                "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                             "transformers": transformers.__version__, "torch": torch.__version__},
                "float_sha256": float_sha,
                "config": json.loads((out / "config.json").read_text()),
                "tensors": {key: [str(t.dtype).removeprefix("torch."), list(t.shape), tensor_sha256(t)]
                            for key, t in sorted(tensors.items())},
            }
        (HERE / f"{name}.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
        print("wrote", HERE / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1:] or list(SCHEMES))
