"""Find where a decoder writes into its residual stream, by name patterns, with one override.

No class per model family: the decoder layers are the ``ModuleList`` with one entry per hidden
layer; inside each layer the token mixers (attention, linear attention, state-space blocks),
the MLP block, their output projections and any post-norms (the "sandwich" of Gemma 2 and 3,
OLMo 2, GLM-4) are found by regular expressions. Anything else can be described with a
:class:`LayoutSpec` override; :func:`refdir.model.layout_check.verify_ablation` checks on the model
itself that what was found is everything that writes into the residual stream.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from refdir.errors import RefdirError
from refdir.model.layout_spec import LayoutSpec

__all__ = [
    "LayerLayout",
    "LayoutSpec",
    "ModelLayout",
    "OutputWeight",
    "Write",
    "effective_norm_scale",
    "find_layout",
    "model_signature",
]


@dataclass(frozen=True)
class OutputWeight:
    """A parameter whose output is added to the residual stream.

    ``axis`` is its residual (d_model) axis: -2 for a ``Linear`` weight [d, in] and fused
    experts [E, d, in]; -1 for a GPT-2 ``Conv1D`` weight [in, d] and transposed fused experts
    [E, in, d]. ``bias``: the name of a bias on the same module whose last axis is d_model
    (``bias``, or ``down_proj_bias`` of fused experts), if there is one."""

    module: nn.Module
    name: str
    axis: int
    bias: str | None = None

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass(frozen=True)
class Write:
    """What one block adds to the residual stream: ``module``'s output (the block itself, or
    the norm after it in sandwich families), produced by ``weights``."""

    module: nn.Module
    weights: tuple[OutputWeight, ...]
    norm: nn.Module | None = None


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer: the blocks whose outputs are added to the residual stream."""

    layer: nn.Module
    attn: nn.Module | None
    """The layer's (first) token mixer, which the suffix analysis reads attention heads from
    (None where the layout has no mixers: ``LayoutSpec(attn=None)``)."""
    attn_out: nn.Module | None
    mlp: nn.Module | None
    writes: tuple[Write, ...]
    """Every mixer's write, then the MLP's."""

    @property
    def post_norms(self) -> bool:
        return any(w.norm is not None for w in self.writes)

    @property
    def mlp_out(self) -> tuple[OutputWeight, ...]:
        """The output weights of the (first) MLP block."""
        for write in self.writes:
            if write.module is self.mlp:
                return write.weights
        return self.writes[-1].weights  # sandwich: the post-MLP norm's write


@dataclass(frozen=True)
class ModelLayout:
    layers: nn.ModuleList
    per_layer: tuple[LayerLayout, ...]
    embed: nn.Embedding
    unembed: nn.Module | None
    final_norm: nn.Module | None
    d_model: int
    layers_owner: nn.Module
    """The module that holds the decoder layers (the text decoder of a multimodal model), where
    position embeddings are looked for."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def sandwich(self) -> bool:
        """True for families with norms after attention and MLP (Gemma 2 and 3, OLMo 2)."""
        return any(layer.post_norms for layer in self.per_layer)

    @property
    def residual_writes(self) -> list[tuple[nn.Module, Literal["input", "output"]]]:
        """Where everything written into the residual stream passes, as (module, "input" or
        "output") hook sites: the input of the first layer (the token embedding and whatever
        the model adds to it: position embeddings, an embedding norm, a scale), then the output
        of each layer's mixers and MLP (their post-norms in sandwich families)."""
        first: tuple[nn.Module, Literal["input", "output"]] = (self.layers[0], "input")
        return [first, *((w.module, "output") for layer in self.per_layer for w in layer.writes)]

    @property
    def embeddings(self) -> list[nn.Embedding]:
        """The token embedding, then any other embedding added to it before the first layer
        (GPT-2's learned positions): every ``nn.Embedding`` of d_model features in the module
        that holds the layers, outside the layers and the unembedding."""
        inside = {id(m) for m in self.layers.modules()}
        if self.unembed is not None:
            inside.add(id(self.unembed))
        others = [
            m
            for m in self.layers_owner.modules()
            if isinstance(m, nn.Embedding)
            and m is not self.embed
            and id(m) not in inside
            and m.embedding_dim == self.d_model
        ]
        return [self.embed, *others]

    @property
    def tied(self) -> bool:
        return (
            self.unembed is not None and getattr(self.unembed, "weight", None) is self.embed.weight
        )


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RefdirError(
            f"layout pattern {pattern!r} is not a regular expression: {exc}"
        ) from None


@functools.cache
def _alternatives(pattern: str) -> tuple[re.Pattern[str], ...]:
    """The pattern's top-level alternatives (``|`` outside groups and classes), in order."""
    _compile(pattern)
    parts, depth, start, i = [], 0, 0, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 1
        elif ch == "[":  # a class: skip to its end ("]" right after "[" or "[^" is literal)
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            i += 1 if pattern[i : i + 1] == "]" else 0
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return tuple(_compile(rf"(?:{alt})") for alt in parts)


def _children(parent: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Children whose names match ``pattern``, in the order of its alternatives."""
    found: list[tuple[str, nn.Module]] = []
    for regex in _alternatives(pattern):
        for name, module in parent.named_children():
            if regex.fullmatch(name) and all(m is not module for _, m in found):
                found.append((name, module))
    return found


def _not_found(parent: nn.Module, what: str, where: str) -> RefdirError:
    names = ", ".join(n for n, _ in parent.named_children())
    return RefdirError(
        f"could not find the {what} in {where} (children: {names}); "
        "name it in a LayoutSpec (`layout`)"
    )


def _child(parent: nn.Module, pattern: str, what: str, where: str) -> nn.Module:
    found = _children(parent, pattern)
    if found:
        return found[0][1]
    raise _not_found(parent, what, where)


def _optional_child(parent: nn.Module, pattern: str) -> nn.Module | None:
    found = _children(parent, pattern)
    return found[0][1] if found else None


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
            "set layers in a LayoutSpec (`layout`), e.g. LayoutSpec(layers='model.layers')"
        )
    return max(lists, key=len)


def _bias(module: nn.Module, name: str, d_model: int) -> str | None:
    for candidate in ("bias", f"{name}_bias") if name == "weight" else (f"{name}_bias",):
        value = getattr(module, candidate, None)
        if isinstance(value, torch.Tensor) and value.shape[-1] == d_model:
            return candidate
    return None


def _linear_weight(module: nn.Module, d_model: int) -> OutputWeight | None:
    """The output weight of a ``Linear`` [d, in] or GPT-2 ``Conv1D`` [in, d] writing d_model."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear) and module.out_features == d_model:  # quantized: packed
        return OutputWeight(module, "weight", -2, _bias(module, "weight", d_model))
    if type(module).__name__ == "Conv1D" and weight.shape[1] == d_model:
        return OutputWeight(module, "weight", -1, _bias(module, "weight", d_model))
    return None


def _expert_axis(module: nn.Module, name: str, shape: torch.Size, d_model: int) -> int | None:
    """The d_model axis of a fused expert tensor [E, a, b], or None if it has none."""
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool):  # transformers' experts interface says which
        axis = -1 if transposed else -2
        return axis if shape[axis] == d_model else None
    fits = [axis for axis in (-2, -1) if shape[axis] == d_model]
    if len(fits) == 2:
        raise RefdirError(
            f"cannot tell which axis of {type(module).__name__}.{name} {list(shape)} is the "
            f"residual stream (both have its size) and {type(module).__name__} does not say "
            "(transformers' is_transposed); refdir cannot use these experts"
        )
    return fits[0] if fits else None


def _mlp_outputs(mlp: nn.Module, spec: LayoutSpec, d_model: int) -> tuple[OutputWeight, ...]:
    regex = _compile(rf"(?:{spec.mlp_out})")
    found: list[OutputWeight] = []
    for name, module in mlp.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name and regex.fullmatch(leaf):
            weight = _linear_weight(module, d_model)
            if weight is not None:
                found.append(weight)
        for pname, param in module.named_parameters(recurse=False):
            if regex.fullmatch(pname) and param.dim() == 3:  # fused experts
                axis = _expert_axis(module, pname, param.shape, d_model)
                if axis is not None:
                    found.append(OutputWeight(module, pname, axis, _bias(module, pname, d_model)))
    return tuple(found)


def _mixer_write(name: str, mixer: nn.Module, spec: LayoutSpec, d_model: int, where: str) -> Write:
    out = _child(mixer, spec.attn_out, f"output projection of {name}", where)
    weight = _linear_weight(out, d_model)
    if weight is None:
        raise RefdirError(
            f"the output projection of {name} in {where} ({type(out).__name__}) does not write "
            f"the residual stream's {d_model} features; set attn_out in a LayoutSpec (`layout`)"
        )
    return Write(mixer, (weight,))


def _layer_layout(i: int, layer: nn.Module, spec: LayoutSpec, d_model: int) -> LayerLayout:
    where = f"layer {i} ({type(layer).__name__})"
    mixers = _children(layer, spec.attn) if spec.attn is not None else []
    if spec.attn is not None and not mixers:
        raise _not_found(layer, "attention block", where)
    mlps = _children(layer, spec.mlp) if spec.mlp is not None else []
    if spec.mlp is not None and not mlps:
        raise _not_found(layer, "MLP block", where)
    writes = [_mixer_write(name, m, spec, d_model, where) for name, m in mixers]
    for name, mlp in mlps:
        mlp_out = _mlp_outputs(mlp, spec, d_model)
        if not mlp_out:
            raise RefdirError(
                f"could not find the output projection of {name} in {where}; set "
                "mlp_out in a LayoutSpec (`layout`)"
            )
        writes.append(Write(mlp, mlp_out))
    post_mlp = _optional_child(layer, spec.post_mlp_norm)
    if post_mlp is not None:
        if len(writes) > 2:
            raise RefdirError(
                f"{where} has several mixers or MLPs and post-norms, a layout refdir does not "
                "know; name its parts in a LayoutSpec (`layout`)"
            )
        post_attn = _child(layer, spec.post_attn_norm, "post-attention norm", where)
        writes = [
            Write(post_attn, writes[0].weights, post_attn),
            Write(post_mlp, writes[1].weights, post_mlp),
        ]
    mixer = mixers[0][1] if mixers else None
    mixer_out = writes[0].weights[0].module if mixers else None
    return LayerLayout(layer, mixer, mixer_out, mlps[0][1] if mlps else None, tuple(writes))


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
    owner = next((m for m in model.modules() if any(c is layers for c in m.children())), model)
    return ModelLayout(layers, per_layer, embed, unembed, final_norm, d_model, owner)


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


SIGNATURE_ROWS = 32
"""Unembedding rows a model's signature is made of."""


def model_signature(layout: ModelLayout) -> tuple[float, ...]:
    """What tells two models of the same width apart, robust to their dtype: the norms of a
    fixed spread of rows of the unembedding (the read-out, which refdir's weight edits leave
    as it was; the token embedding where there is none), in float64."""
    module = layout.unembed if layout.unembed is not None else layout.embed
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        weight = layout.embed.weight
    rows = torch.linspace(0, weight.shape[0] - 1, SIGNATURE_ROWS).long().to(weight.device)
    with torch.no_grad():
        norms = weight.detach()[rows].double().norm(dim=-1).cpu()
    return tuple(round(float(n), 6) for n in norms)
