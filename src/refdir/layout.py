"""Find where a decoder writes into its residual stream, by name patterns, with one override.

No class per model family: the decoder layers are the ``ModuleList`` with one entry per hidden
layer; inside each layer the attention and MLP blocks, their output projections and any
post-norms (the "sandwich" of Gemma 2 and 3) are found by regular expressions. Anything else
can be described with a :class:`LayoutSpec` override.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from refdir.errors import RefdirError

__all__ = ["LayerLayout", "LayoutSpec", "ModelLayout", "effective_norm_scale", "find_layout"]


@dataclass(frozen=True)
class LayoutSpec:
    """Regular expressions (matched against a child's full name) that locate each part.

    Override any field to support a model the defaults miss, for example
    ``LayoutSpec(mlp=r"feed_forward", mlp_out=r"w2")``.
    """

    layers: str | None = field(
        default=None,
        metadata={"help": "dotted path of the decoder-layer ModuleList; None finds it by size"},
    )
    attn: str = field(default=r"self_attn|attention|attn", metadata={"help": "attention block"})
    mlp: str = field(
        default=r"mlp|block_sparse_moe|feed_forward|ffn", metadata={"help": "MLP or MoE block"}
    )
    attn_out: str = field(
        default=r"o_proj|out_proj|dense|c_proj|wo", metadata={"help": "attention output projection"}
    )
    mlp_out: str = field(
        default=r"down_proj|w2|fc2|c_proj|dense_4h_to_h|wo",
        metadata={"help": "MLP output projection(s); every match in the MLP subtree is edited"},
    )
    post_attn_norm: str = field(
        default=r"post_attention_layernorm|post_attn_norm",
        metadata={"help": "norm applied to the attention output (sandwich families only)"},
    )
    post_mlp_norm: str = field(
        default=r"post_feedforward_layernorm|post_mlp_layernorm|post_ffw_norm",
        metadata={"help": "norm applied to the MLP output; its presence marks a sandwich family"},
    )
    final_norm: str = field(
        default=r"norm|final_layernorm|ln_f|final_norm", metadata={"help": "final norm"}
    )


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer: the modules whose outputs are added to the residual stream, and the
    weights that produce them."""

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    writers: tuple[nn.Module, nn.Module]
    """Modules whose output is what enters the residual: (attn, mlp), or the two post-norms."""
    attn_out: nn.Module
    mlp_out: tuple[tuple[nn.Module, str], ...]
    """(module, parameter name) of every MLP output weight: a Linear's ``weight`` or a fused
    expert tensor such as ``down_proj`` with shape [experts, d_model, d_ff]."""
    post_norms: tuple[nn.Module, nn.Module] | None


@dataclass(frozen=True)
class ModelLayout:
    layers: nn.ModuleList
    per_layer: tuple[LayerLayout, ...]
    embed: nn.Embedding
    unembed: nn.Module | None
    final_norm: nn.Module | None
    d_model: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def sandwich(self) -> bool:
        """True for families with norms after attention and MLP (Gemma 2 and 3)."""
        return self.per_layer[0].post_norms is not None

    @property
    def residual_writers(self) -> list[nn.Module]:
        """Every module whose output is added to the residual stream: the embedding, then
        each layer's attention and MLP writers (post-norms in sandwich families)."""
        return [self.embed, *(w for layer in self.per_layer for w in layer.writers)]

    @property
    def tied(self) -> bool:
        return (
            self.unembed is not None and getattr(self.unembed, "weight", None) is self.embed.weight
        )


def _child(parent: nn.Module, pattern: str, what: str, where: str) -> nn.Module:
    regex = re.compile(rf"(?:{pattern})")
    for name, module in parent.named_children():
        if regex.fullmatch(name):
            return module
    names = ", ".join(n for n, _ in parent.named_children())
    raise RefdirError(
        f"could not find the {what} in {where} (children: {names}); "
        f"pass a LayoutSpec override for {what}"
    )


def _optional_child(parent: nn.Module, pattern: str) -> nn.Module | None:
    regex = re.compile(rf"(?:{pattern})")
    return next((m for n, m in parent.named_children() if regex.fullmatch(n)), None)


def _find_layers(model: nn.Module, spec: LayoutSpec, n_layers: int | None) -> nn.ModuleList:
    if spec.layers is not None:
        module = model.get_submodule(spec.layers)
        if not isinstance(module, nn.ModuleList):
            raise RefdirError(f"layout override: {spec.layers!r} is not a ModuleList")
        return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        lists = [m for m in lists if len(m) == n_layers]
    if not lists:
        raise RefdirError(
            "could not find the decoder layers (a ModuleList with one entry per hidden layer); "
            "pass LayoutSpec(layers='model.layers')"
        )
    return max(lists, key=len)


def _mlp_outputs(
    mlp: nn.Module, spec: LayoutSpec, d_model: int
) -> tuple[tuple[nn.Module, str], ...]:
    regex = re.compile(rf"(?:{spec.mlp_out})")
    found: list[tuple[nn.Module, str]] = []
    for name, module in mlp.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name and regex.fullmatch(leaf) and isinstance(module, nn.Linear):
            found.append((module, "weight"))
        for pname, param in module.named_parameters(recurse=False):
            if regex.fullmatch(pname) and param.dim() == 3 and param.shape[1] == d_model:
                found.append((module, pname))  # fused experts [E, d_model, d_ff]
    return tuple(found)


def _layer_layout(i: int, layer: nn.Module, spec: LayoutSpec, d_model: int) -> LayerLayout:
    where = f"layer {i} ({type(layer).__name__})"
    attn = _child(layer, spec.attn, "attention block", where)
    mlp = _child(layer, spec.mlp, "MLP block", where)
    attn_out = _child(attn, spec.attn_out, "attention output projection", where)
    mlp_out = _mlp_outputs(mlp, spec, d_model)
    if not mlp_out:
        raise RefdirError(
            f"could not find the MLP output projection in {where}; pass LayoutSpec(mlp_out=...)"
        )
    post_mlp = _optional_child(layer, spec.post_mlp_norm)
    post_norms: tuple[nn.Module, nn.Module] | None = None
    if post_mlp is not None:
        post_attn = _child(layer, spec.post_attn_norm, "post-attention norm", where)
        post_norms = (post_attn, post_mlp)
    writers = post_norms if post_norms is not None else (attn, mlp)
    return LayerLayout(layer, attn, mlp, writers, attn_out, mlp_out, post_norms)


def find_layout(model: nn.Module, spec: LayoutSpec | None = None) -> ModelLayout:
    """Discover the residual-stream layout of a causal LM, or fail with a one-line error."""
    spec = spec or LayoutSpec()
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    n_layers = getattr(text_config, "num_hidden_layers", None)
    layers = _find_layers(model, spec, n_layers)
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if callable(get_embed) else None
    if not isinstance(embed, nn.Embedding):
        raise RefdirError("could not find the token embedding (get_input_embeddings returned none)")
    d_model = int(embed.weight.shape[1])
    per_layer = tuple(_layer_layout(i, layer, spec, d_model) for i, layer in enumerate(layers))
    get_unembed = getattr(model, "get_output_embeddings", None)
    unembed = get_unembed() if callable(get_unembed) else None
    final_norm = None
    base = getattr(model, "base_model", model)
    if isinstance(base, nn.Module):
        final_norm = _optional_child(base, spec.final_norm)
    return ModelLayout(layers, per_layer, embed, unembed, final_norm, d_model)


def effective_norm_scale(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The elementwise scale an RMS-style norm applies: its output on a vector of ones.

    Works for the ``weight`` and ``1 + weight`` conventions alike without knowing which is
    used; computed on a float32 copy so the caller's module is untouched. The overall scale
    (``1/sqrt(1 + eps)``) does not matter to callers, which normalise the result.
    """
    probe = copy.deepcopy(norm).to(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = probe(torch.ones(1, d_model, dtype=torch.float32))
    return out.reshape(-1)
