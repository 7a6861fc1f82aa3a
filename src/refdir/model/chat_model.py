"""The model refdir works on: a causal LM with its tokenizer, its chat format and the layout of
its residual stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refdir.model.chat import ChatFormat
from refdir.model.layout import ModelLayout, find_layout
from refdir.model.layout_spec import LayoutSpec

__all__ = ["ChatModel"]


@dataclass
class ChatModel:
    """A causal LM with its tokenizer, chat format and residual-stream layout.

    Wrap any loaded Hugging Face model with ``ChatModel(model, tokenizer, name=...)``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str = "model"
    revision: str | None = None
    system: str | None = None
    chat_template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    layout_spec: LayoutSpec | None = None
    layout: ModelLayout = field(init=False)
    chat: ChatFormat = field(init=False)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.layout = find_layout(self.model, self.layout_spec)
        self.chat = ChatFormat.from_tokenizer(
            self.tokenizer, self.system, self.chat_template, self.template_kwargs, self.context
        )
        self.model.eval()

    @property
    def context(self) -> int | None:
        """The most tokens the model takes (its position embeddings' length), where its
        config says."""
        config = getattr(self.model, "config", None)
        text = config.get_text_config() if config is not None else None
        limit = getattr(text, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the token embedding."""
        return self.layout.embed.weight.device

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers
