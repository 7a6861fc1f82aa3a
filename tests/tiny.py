"""Tiny offline models and a byte-level tokenizer with a chat template, for fast tests."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from refdir.model.chat_model import ChatModel
from refdir.model.layout_spec import LayoutSpec
from refdir.study.config import RunConfig

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + len(SPECIALS)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHATML_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe tiny.<|im_end|>\n{% endif %}"
    + CHATML
)
"""ChatML that adds a default system prompt, as SmolLM2's template does."""


def tiny_tokenizer(
    chat_template: str | None = CHATML, reversed_bytes: bool = False
) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 5 special tokens then one token per byte, no merges;
    ``reversed_bytes``: the byte tokens in reverse order (the same texts, other token ids)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet, reverse=reversed_bytes):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = chat_template
    return fast


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}"
    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant'"
    " else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def sentencepiece_tokenizer(chat_template: str, merges: bool = True) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer with a dummy prefix (``▁`` before every text, as
    Llama-2's and Mistral's, whose fast tokenizers normalize the same way: prepend ``▁``, then
    spaces to ``▁``): characters plus a few merges such as ``▁I``."""
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in ["▁", "\n", *(chr(c) for c in range(33, 127))]:
        vocab[ch] = len(vocab)
    pairs = [("▁", "I"), ("▁", "["), ("▁", "c"), ("a", "n")] if merges else []
    for a, b in pairs:
        vocab[a + b] = len(vocab)
    model = models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = chat_template
    return fast


def byte_tokenizer_with(specials: list[str], chat_template: str) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with other special tokens (a Llama-3-style vocabulary)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "I"), ("Ċ", "Ċ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        additional_special_tokens=specials[2:],
    )
    fast.chat_template = chat_template
    return fast


_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHS: dict[str, Any] = {
    "llama": lambda: T.LlamaConfig(**_COMMON),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=8),
    "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=8),
    "mistral": lambda: T.MistralConfig(**_COMMON),
    "phi3": lambda: T.Phi3Config(**_COMMON),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        **_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
    ),
    "mixtral": lambda: T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
}
SANDWICH = {"gemma2", "gemma3"}

TINY_RUN = RunConfig(
    model="tiny",
    n_train=6,
    n_val=4,
    harmful_eval=("jailbreakbench", "harmful_test"),
    n_eval_harmful=2,
    n_eval_harmless=2,
    max_new_tokens=2,
    long_tokens=4,
    refusal_tokens=tuple(range(5, 135)),
    n_ce=2,
    fallback_kl_bounds=(1.0, 1e9),
    induce_min=-1e9,
    seed=1,
    filter_prompts=False,
)
"""``refdir run`` in seconds on a tiny model. A random tiny model refuses nothing: the refusal
tokens are given and the prompt filter (tested on its own in test_select) is off."""

DEVICE = os.environ.get("REFDIR_TEST_DEVICE", "cpu")
"""Where tiny models are made: ``REFDIR_TEST_DEVICE=cuda pytest`` runs the suite's models on a GPU."""

_MOE: dict[str, Any] = dict(num_experts_per_tok=2, moe_intermediate_size=16)


def _more(model_type: str, **extra: Any) -> Any:
    return T.AutoConfig.for_model(model_type, **{**_COMMON, **extra})


MORE_ARCHS: dict[str, Any] = {
    # fused experts stored [E, in, d] with biases (transformers' is_transposed)
    "gpt_oss": lambda: _more("gpt_oss", head_dim=8, num_local_experts=4, **_MOE),
    # fused experts [E, in, d] without the flag, and a shared expert
    "llama4_text": lambda: _more(
        "llama4_text", head_dim=8, num_local_experts=4, num_experts_per_tok=1
    ),
    # linear-attention (gated delta) and attention layers, MoE with a shared expert
    "qwen3_next": lambda: _more(
        "qwen3_next",
        head_dim=8,
        num_experts=4,
        shared_expert_intermediate_size=16,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        **_MOE,
    ),
    # state-space (Mamba) and attention layers
    "jamba": lambda: _more(
        "jamba", num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1
    ),
    # attention and Mamba side by side in every layer: three writers
    "falcon_h1": lambda: _more(
        "falcon_h1", head_dim=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1
    ),
    # post-norms only (no pre-norms)
    "olmo2": lambda: _more("olmo2"),
    # a pre-MLP norm named post_attention_layernorm beside the real post-attention norm
    "glm4": lambda: _more("glm4", head_dim=8),
    # multi-head latent attention, shared and routed experts, a dense first layer
    "deepseek_v3": lambda: _more(
        "deepseek_v3",
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        **_MOE,
    ),
    # Conv1D projections [in, d] and learned position embeddings
    "gpt2": lambda: _more("gpt2"),
    # a LayerNorm between the embedding and the first layer: hooks work, export is refused
    "bloom": lambda: _more("bloom"),
    # Granite 4: Mamba and attention layers, experts with a shared MLP beside them
    "granitemoehybrid": lambda: _more(
        "granitemoehybrid",
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
        mamba_n_heads=8,
        mamba_d_head=8,
        layer_types=["mamba", "attention", "mamba"],
    ),
    # LFM2: gated short-convolution layers (child "conv") beside attention layers
    "lfm2": lambda: _more("lfm2", layer_types=["conv", "full_attention", "conv"]),
    # Nemotron-H: one "mixer" per layer (Mamba, attention or MLP); needs LAYOUTS' override
    "nemotron_h": lambda: _more(
        "nemotron_h",
        hybrid_override_pattern="M*-",
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=1,
        ssm_state_size=16,
    ),
    # the residual stream is the norms' output: no set of hooks ablates it (refused)
    "minimax": lambda: _more("minimax", head_dim=8, num_local_experts=4, num_experts_per_tok=2),
}
"""Families beyond the paper's, each built for a layout feature of its own."""

LAYOUTS: dict[str, dict[str, str | None]] = {
    # no separate MLP block; the MLP "mixer" writes through down_proj
    "nemotron_h": {"mlp": None, "attn_out": "o_proj|out_proj|down_proj"},
}
"""The ``--layout`` overrides (LayoutSpec fields) of the families the defaults do not cover."""


def tiny_model(
    arch: str = "llama", seed: int = 0, tied: bool | None = None, **changes: Any
) -> PreTrainedModel:
    """A tiny random model of ``arch``; ``changes`` set config fields (``intermediate_size=32``)."""
    torch.manual_seed(seed)
    config = {**ARCHS, **MORE_ARCHS}[arch]()
    if tied is not None:
        config.tie_word_embeddings = tied
    for key, value in changes.items():
        setattr(config, key, value)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0 in the 1+w convention): make them distinctive
        for name, param in model.named_parameters():
            if "norm" in name or (arch in MORE_ARCHS and "bias" in name):  # biases start at 0
                param.add_(0.3 * torch.randn_like(param))
    return model.eval().to(DEVICE)


def tiny_chat_model(arch: str = "llama", seed: int = 0, tied: bool | None = None) -> ChatModel:
    spec = LayoutSpec.from_fields(LAYOUTS[arch]) if arch in LAYOUTS else None
    return ChatModel(
        tiny_model(arch, seed, tied), tiny_tokenizer(), name=f"tiny-{arch}", layout_spec=spec
    )
