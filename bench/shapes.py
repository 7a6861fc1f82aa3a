"""Random-weight chat models in the shapes of real ones, for benchmarks that need no download.

A shape is a config: the layer count, widths, heads and vocabulary size of a published model,
with random weights. Compute, memory traffic and cache sizes match the real model; refusal does
not, so a benchmark on these measures speed, never a direction.

The tokenizer is a real one when ``tokenizer`` names a folder (the organism's cache folder,
``~/.cache/refdir/organism-*``, holds SmolLM2's), so that prompts have realistic token counts;
its ids must fit the shape's vocabulary (SmolLM2's 49152 fit every shape here). Without one,
a byte-level tokenizer with SmolLM2's chat template stands in (prompts about 4x longer).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from refdir.model.chat_model import ChatModel

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


SHAPES: dict[str, dict[str, object]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: the organism's base
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct (the paper's Llama-3 8B)
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),
}


REFUSAL_TEXTS = ("I", "As")
"""The paper's Llama-3 refusal tokens, which benchmarks on a random model (it refuses nothing,
so none can be derived from its answers) score with."""


def refusal_token_ids(cm: ChatModel) -> list[int]:
    """The first token id of each of :data:`REFUSAL_TEXTS` in ``cm``'s tokenizer."""
    return [cm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in REFUSAL_TEXTS]


def sync() -> None:
    """Wait for the GPU's queued work, so that wall times include it (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def config_of(shape: str) -> T.PretrainedConfig:
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    model_type = str(fields.pop("model_type"))
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    return T.AutoConfig.for_model(
        model_type, **fields, max_position_embeddings=4096, rope_parameters=rope
    )


def byte_tokenizer(vocab_size: int = 49152) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges, padded with filler tokens to ``vocab_size``."""
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:  # the real vocabulary's size, for the unembedding's cost
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = SMOLLM2_TEMPLATE
    return fast


def random_chat_model(
    shape: str,
    tokenizer: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ChatModel:
    """``shape`` with random weights made on ``device`` (an 8B model takes seconds on a GPU)."""
    config = config_of(shape)
    tok: PreTrainedTokenizerBase
    tok = byte_tokenizer() if tokenizer is None else AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > config.vocab_size:
        raise SystemExit(f"the tokenizer's {len(tok)} ids do not fit {shape}'s vocabulary")
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    began = time.perf_counter()
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(
        f"random {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{dtype}, made on {device} in {time.perf_counter() - began:.1f} s"
    )
    return ChatModel(model, tok, name=f"random-{shape}")
