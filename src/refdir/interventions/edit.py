"""Weighted edits: a generalisation of the paper's directional ablation that
:mod:`refdir.optimize` searches over.

An :class:`Edit` removes a subspace (one direction, or k orthonormal ones) from what each block
writes into the residual stream, with a weight per site: one for the embedding, one per layer
for its token mixers (attention) and one for its MLP. Weight 1 everywhere with one direction is
the paper's ablation; weight ``w`` removes the fraction ``w`` of the component along the
subspace (``x - w Q^T Q x``). Optionally the edit is *norm-preserving*: every input feature of
an output projection (a column of ``o_proj``/``down_proj``), and every embedding row, keeps
the length it had before its component along the subspace was removed, so the edit changes
where the features write, not how strongly. Optionally each layer removes a subspace of its own
(``layer_basis``: the refusal direction read at that layer, as heretic's per-layer directions),
the embedding still the edit's ``basis``.

Each edit has two forms that agree wherever the paper's ablation and orthogonalization agree:

* hooks (:meth:`Edit.hooks`): the write sites' outputs projected, and, when norm-preserving,
  each output projection's input scaled per feature (and each embedding row rescaled);
* a weight edit (:func:`refdir.interventions.edit_weights.edit_weights`): the same linear maps
  folded into the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.projection import (
    column_scale,
    layout_of,
    orthonormal,
    write_basis,
)
from refdir.io import atomic_path
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import DeviceCopies, Hook, hooked, map_output
from refdir.model.layout import LayerLayout, ModelLayout, OutputWeight, Write

__all__ = ["EDIT_FILE", "Edit", "component_of"]

EDIT_FILE = "edit.safetensors"
Component = Literal["attn", "mlp"]
M = TypeVar("M", ChatModel, nn.Module)
MAX_WEIGHT = 2.0
"""The largest weight an edit takes: above 1 it overshoots, writing against the direction."""


def component_of(layer: LayerLayout, index: int) -> Component:
    """Which weight of a layer a write takes: its MLP's (the last write, when the layer has an
    MLP) or its token mixers'."""
    last = index == len(layer.writes) - 1
    return "mlp" if last and layer.mlp is not None else "attn"


@dataclass(frozen=True, eq=False)
class Edit:
    """A weighted removal of a subspace from the residual stream (see the module's doc).

    ``basis``: [k, d] orthonormal rows, float32. ``attn`` and ``mlp``: one weight per layer;
    ``embed``: the embedding's weight. ``params``: how the edit was made (a search's parameters),
    kept with it for provenance. ``layer_basis``: [n_layers, k, d], each layer's own subspace,
    removed from that layer's writes in place of ``basis`` (None: ``basis`` everywhere)."""

    basis: torch.Tensor
    attn: tuple[float, ...]
    mlp: tuple[float, ...]
    embed: float = 1.0
    norm_preserving: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    layer_basis: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = self.basis
        if b.dim() != 2 or b.shape[0] < 1 or b.dtype != torch.float32:
            raise RefdirError(f"an edit's basis is float32 [k, d], got {b.dtype} {list(b.shape)}")
        _check_orthonormal(b)
        per = self.layer_basis
        if per is not None:
            want = [len(self.attn), *b.shape]
            if per.dtype != torch.float32 or list(per.shape) != want:
                raise RefdirError(
                    f"an edit's per-layer bases are float32 {want} (layers, k, d), got "
                    f"{per.dtype} {list(per.shape)}"
                )
            for layer_b in per:
                _check_orthonormal(layer_b)
        if len(self.attn) != len(self.mlp):
            raise RefdirError(
                f"an edit needs one attention and one MLP weight per layer, got {len(self.attn)} "
                f"and {len(self.mlp)}"
            )
        for name, value in [
            ("embed", self.embed),
            *(("attn/mlp", w) for w in self.attn + self.mlp),
        ]:
            if not (math.isfinite(value) and 0.0 <= value <= MAX_WEIGHT):
                raise RefdirError(f"edit weight {name} must be in 0..{MAX_WEIGHT:g}, got {value}")

    @classmethod
    def ablation(cls, direction: Direction | torch.Tensor, n_layers: int) -> Edit:
        """The paper's ablation as an edit: one direction, weight 1 everywhere."""
        vector = direction.vector if isinstance(direction, Direction) else direction
        ones = (1.0,) * n_layers
        return cls(orthonormal(vector.reshape(1, -1)), ones, ones, 1.0)

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    def weight(self, layer: int, component: Component) -> float:
        return self.attn[layer] if component == "attn" else self.mlp[layer]

    def basis_at(self, layer: int | None) -> torch.Tensor:
        """The subspace removed from ``layer``'s writes (None: the embedding's)."""
        if layer is None or self.layer_basis is None:
            return self.basis
        return self.layer_basis[layer]

    def describe(self) -> str:
        parts = [f"k={self.k}"] if self.k > 1 else []
        if self.layer_basis is not None:
            parts.append("per-layer directions")
        if self.norm_preserving:
            parts.append("norm-preserving")
        return "edit" + (f" ({', '.join(parts)})" if parts else "")

    def check(self, layout: ModelLayout) -> None:
        """Refuse an edit that does not fit the model."""
        if self.basis.shape[1] != layout.d_model:
            raise RefdirError(
                f"the edit has size {self.basis.shape[1]} but the model's residual stream has "
                f"{layout.d_model}; make the edit for this model"
            )
        if self.n_layers != layout.n_layers:
            raise RefdirError(
                f"the edit has weights for {self.n_layers} layers but the model has "
                f"{layout.n_layers}; make the edit for this model"
            )
        if self.norm_preserving:
            for layer in layout.per_layer:
                for write in layer.writes:
                    for weight in write.weights:
                        if weight.param.dim() != 2:
                            column_scale(weight.param, weight.axis, self.basis, 1.0)  # the error

    def sites(self, layout: ModelLayout) -> Iterator[tuple[int, Write, float]]:
        """Each (layer, write, weight) with a weight above zero."""
        for index, layer in enumerate(layout.per_layer):
            for i, write in enumerate(layer.writes):
                w = self.weight(index, component_of(layer, i))
                if w > 0:
                    yield index, write, w

    def projector(self, weight: float, basis: torch.Tensor | None = None) -> Any:
        """x -> x - w (x Q^T) Q in float32, cast back (``basis``: Q, default the edit's)."""
        copies = DeviceCopies(self.basis if basis is None else basis)

        def fn(x: torch.Tensor) -> torch.Tensor:
            q = copies.on(x.device)
            xf = x.float()
            return (xf - weight * ((xf @ q.T) @ q)).to(x.dtype)

        return fn

    def hooks(self, model: ChatModel | nn.Module) -> list[Hook]:
        """The hooks that carry out this edit on ``model`` (see the module's doc)."""
        layout = layout_of(model)
        self.check(layout)
        hooks: list[Hook] = []
        if self.embed > 0:
            hooks += self._embedding_hooks(layout)
        for index, write, w in self.sites(layout):
            own = self.basis_at(index)
            if self.norm_preserving:  # each column back at its length once edited
                basis = write_basis(layout, write, own)
                hooks += [
                    _scale_input(weight, column_scale(weight.param, weight.axis, basis, w))
                    for weight in write.weights
                ]
            hooks.append((write.module, "output", map_output(self.projector(w, own))))
        return hooks

    def _embedding_hooks(self, layout: ModelLayout) -> list[Hook]:
        project = self.projector(self.embed)
        if not self.norm_preserving:  # the input of the first layer, as the paper's ablation
            first = layout.layers[0]

            def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if args and isinstance(args[0], torch.Tensor):
                    return (project(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}

            return [(first, "input", pre)]

        def keep_length(x: torch.Tensor) -> torch.Tensor:  # each row keeps its length
            xf = x.float()
            edited = project(xf)
            before = xf.norm(dim=-1, keepdim=True)
            after = edited.norm(dim=-1, keepdim=True)
            ok = after > 1e-12 * before
            return torch.where(ok, edited * (before / after.clamp_min(1e-30)), edited).to(x.dtype)

        return [(embedding, "output", map_output(keep_length)) for embedding in layout.embeddings]

    @contextmanager
    def apply(self, model: M) -> Iterator[M]:
        """Within the block, ``model`` runs under this edit (hooks validated first, always
        removed)."""
        with hooked(self.hooks(model)):
            yield model

    def save(self, path: str | Path) -> Path:
        """Write ``edit.safetensors`` into the folder ``path`` (tensors and JSON metadata)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "embed": self.embed,
            "norm_preserving": self.norm_preserving,
            "params": self.params,
        }
        tensors = {
            "basis": self.basis.contiguous(),
            "attn": torch.tensor(self.attn, dtype=torch.float64),
            "mlp": torch.tensor(self.mlp, dtype=torch.float64),
        }
        if self.layer_basis is not None:
            tensors["layer_basis"] = self.layer_basis.contiguous()
        target = folder / EDIT_FILE
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={"refdir_edit": json.dumps(meta)})
        return target

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read an edit written by :meth:`save` (a folder or its ``edit.safetensors``)."""
        target = Path(path)
        if target.is_dir():
            target = target / EDIT_FILE
        if not target.is_file():
            raise RefdirError(f"no edit at {target}; make one with refdir optimize (Edit.save)")
        try:
            with safe_open(str(target), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["refdir_edit"])
                basis = f.get_tensor("basis")
                attn = tuple(float(x) for x in f.get_tensor("attn").tolist())
                mlp = tuple(float(x) for x in f.get_tensor("mlp").tolist())
                per = f.get_tensor("layer_basis") if "layer_basis" in f.keys() else None  # noqa: SIM118
            return cls(
                basis,
                attn,
                mlp,
                float(meta["embed"]),
                bool(meta["norm_preserving"]),
                dict(meta["params"]),
                per,
            )
        except RefdirError:
            raise
        except Exception as exc:  # safetensors, json and missing keys raise errors of their own
            raise RefdirError(
                f"{target} is not an edit written by refdir ({exc}); make it again with "
                "refdir optimize"
            ) from None


def _check_orthonormal(basis: torch.Tensor) -> None:
    gram = basis.double() @ basis.double().T
    if not torch.allclose(gram, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-5):
        raise RefdirError("an edit's basis must have orthonormal rows; build it with orthonormal()")


def _scale_input(weight: OutputWeight, scale: torch.Tensor) -> Hook:
    """A pre-hook on ``weight``'s module that scales each input feature by ``scale``."""
    copies = DeviceCopies(scale)

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        s = copies.on(x.device)
        return ((x.float() * s).to(x.dtype), *args[1:]), kwargs

    return (weight.module, "input", pre)
