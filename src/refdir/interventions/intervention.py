"""Scoped interventions on the residual stream: directional ablation and activation addition.

An :class:`Intervention` is a value (what to do: nothing, ablate a direction at every layer
and position, or add ``coeff`` x a direction to one layer's input) that every evaluation,
scoring and benchmark path takes. Applying it is scoped:

    with refdir.ablate(model, direction):
        completions = refdir.generate(cm, prompts)

Hooks need only a model and the layout of its residual stream, so ``model`` may be a
:class:`~refdir.model.chat_model.ChatModel` or a bare transformers model. Everything is
validated before any hook is registered, and every hook is removed on exit, exceptions
included. Scopes nest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.projection import layout_of
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import DeviceCopies, Hook, hooked, map_input, map_sites, project_out
from refdir.model.layout import ModelLayout

__all__ = [
    "KINDS",
    "NONE",
    "Intervention",
    "Kind",
    "ablate",
    "add",
    "layout_of",
]

Kind = Literal["none", "ablate", "actadd", "edit"]
KINDS: tuple[Kind, ...] = ("none", "ablate", "actadd", "edit")
"""``none``; ``ablate``: the direction projected out of everything written into the residual
stream; ``actadd``: ``coeff`` x the direction added to one layer's input at every position;
``edit``: a weighted :class:`~refdir.interventions.edit.Edit` (what ``refdir optimize`` finds)."""

M = TypeVar("M", ChatModel, nn.Module)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One intervention on the residual stream (see :data:`KINDS`).

    ``direction`` is a :class:`~refdir.directions.direction.Direction` or a 1-D tensor of the
    model's ``d_model`` values; ``layer`` is where ``actadd`` adds it (default: the
    direction's own layer; required for a bare tensor)."""

    kind: Kind = "none"
    direction: Direction | torch.Tensor | None = None
    coeff: float = 1.0
    layer: int | None = None
    edit: Edit | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RefdirError(f"unknown intervention {self.kind!r}; use one of {', '.join(KINDS)}")
        if (self.kind == "edit") != (self.edit is not None):
            raise RefdirError("the edit intervention, and only it, takes an `edit`")
        if self.kind not in ("none", "edit") and self.direction is None:
            raise RefdirError(f"the {self.kind} intervention needs a `direction`")
        if not math.isfinite(self.coeff):
            raise RefdirError(f"`coeff` must be a finite number, got {self.coeff}")
        tensor = self.direction
        if tensor is not None and not isinstance(tensor, Direction):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
                raise RefdirError(
                    "a direction must be a Direction or a 1-D tensor; pass "
                    "cands.direction(position, layer) or one vector of the model's d_model values"
                )
            if self.kind == "actadd" and self.layer is None:
                raise RefdirError("give the `layer` to add a bare tensor at")

    @classmethod
    def ablation(cls, direction: Direction | torch.Tensor) -> Intervention:
        """The direction ablated at every layer and position."""
        return cls("ablate", direction)

    @classmethod
    def addition(
        cls, direction: Direction | torch.Tensor, coeff: float = 1.0, layer: int | None = None
    ) -> Intervention:
        """``coeff`` x the direction added to ``layer``'s input (default: the direction's)."""
        return cls("actadd", direction, coeff, layer)

    @classmethod
    def edited(cls, edit: Edit) -> Intervention:
        """A weighted edit (:class:`~refdir.interventions.edit.Edit`)."""
        return cls("edit", edit=edit)

    @property
    def at_layer(self) -> int:
        """The layer ``actadd`` adds at (0 for the other kinds)."""
        if self.kind != "actadd":
            return 0
        if self.layer is not None:
            return self.layer
        assert isinstance(self.direction, Direction)  # __post_init__ refuses a bare tensor
        return self.direction.layer

    def vector(self, layout: ModelLayout) -> torch.Tensor:
        """The direction as a float32 vector, once it is known to fit the model."""
        direction = self.direction
        if direction is None:
            raise RefdirError("the none intervention has no direction")
        if isinstance(direction, Direction):
            direction.fits(layout)
            return direction.vector.detach().float()
        if direction.shape[0] != layout.d_model:
            raise RefdirError(
                f"direction has size {direction.shape[0]} but the model's residual stream has "
                f"{layout.d_model}; extract a direction from this model"
            )
        return direction.detach().float()

    def hooks(self, model: ChatModel | nn.Module) -> list[Hook]:
        """The hooks that carry out this intervention on ``model`` (none for ``none``)."""
        if self.kind == "none":
            return []
        if self.edit is not None:
            return self.edit.hooks(model)
        layout = layout_of(model)
        vector = self.vector(layout)
        if self.kind == "ablate":
            norm = vector.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise RefdirError("cannot ablate a zero or non-finite direction")
            return map_sites(layout.residual_writes, project_out(vector / norm))
        layer = self.at_layer
        if not 0 <= layer < layout.n_layers:
            raise RefdirError(
                f"cannot add at layer {layer}: the model has layers 0..{layout.n_layers - 1}"
            )
        copies = DeviceCopies(self.coeff * vector)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return (x.float() + copies.on(x.device)).to(x.dtype)

        return [(layout.layers[layer], "input", map_input(fn))]

    @contextmanager
    def apply(self, model: M) -> Iterator[M]:
        """Within the block, ``model`` runs under this intervention (hooks validated first,
        always removed)."""
        with hooked(self.hooks(model)):
            yield model

    def describe(self) -> str:
        """A short label: ``none``, ``ablate``, ``actadd x1`` or ``edit``."""
        if self.edit is not None:
            return self.edit.describe()
        return f"actadd x{self.coeff:g}" if self.kind == "actadd" else self.kind


NONE = Intervention()
"""The model as it is."""


def ablate(model: M, direction: Direction | torch.Tensor) -> AbstractContextManager[M]:
    """Directional ablation at every layer and position, generated tokens included."""
    return Intervention.ablation(direction).apply(model)


def add(
    model: M, direction: Direction | torch.Tensor, coeff: float = 1.0, layer: int | None = None
) -> AbstractContextManager[M]:
    """Activation addition of ``coeff`` x direction at ``layer`` (default: the direction's)."""
    return Intervention.addition(direction, coeff, layer).apply(model)
