"""Scoped interventions on the residual stream: directional ablation and activation addition.

    with ablate(cm, direction):
        completions = generate(cm, prompts)

Both validate their arguments before any hook is registered, and remove every hook on exit,
exceptions included. Scopes nest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.hooks import Hook, TensorMap, hooked, map_input, map_output
from refdir.model import ChatModel

__all__ = ["ablate", "ablation_hooks", "add", "addition_hooks", "project_out"]


def _vector(direction: Direction | torch.Tensor, cm: ChatModel) -> torch.Tensor:
    if isinstance(direction, Direction):
        direction.check(cm.d_model, cm.n_layers)
        return direction.vector.detach().float()
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1:
        raise RefdirError("a direction must be a Direction or a 1-D tensor")
    if direction.shape[0] != cm.d_model:
        raise RefdirError(
            f"direction has size {direction.shape[0]} but the model's residual stream has {cm.d_model}"
        )
    return direction.detach().float()


def project_out(unit: torch.Tensor) -> TensorMap:
    """x -> x - (x . r) r for a unit vector r, computed in float32 and cast back."""
    cache: dict[torch.device, torch.Tensor] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = cache.get(x.device)
        if r is None:
            r = cache[x.device] = unit.to(x.device)
        xf = x.float()
        return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)

    return fn


def ablation_hooks(cm: ChatModel, direction: Direction | torch.Tensor) -> list[Hook]:
    """Hooks that remove the direction from everything written into the residual stream: the
    embedding and, at every layer, what attention and MLP add (after any post-norm)."""
    vector = _vector(direction, cm)
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise RefdirError("cannot ablate a zero or non-finite direction")
    fn = project_out(vector / norm)
    return [(module, "output", map_output(fn)) for module in cm.layout.residual_writers]


def addition_hooks(
    cm: ChatModel, direction: Direction | torch.Tensor, coeff: float = 1.0, layer: int | None = None
) -> list[Hook]:
    """A hook that adds ``coeff * direction`` to one layer's input at every position."""
    vector = _vector(direction, cm)
    if layer is None:
        if not isinstance(direction, Direction):
            raise RefdirError("give the layer to add a bare tensor at")
        layer = direction.layer
    if not 0 <= layer < cm.n_layers:
        raise RefdirError(f"cannot add at layer {layer}: the model has layers 0..{cm.n_layers - 1}")
    cache: dict[torch.device, torch.Tensor] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        v = cache.get(x.device)
        if v is None:
            v = cache[x.device] = (coeff * vector).to(x.device)
        return (x.float() + v).to(x.dtype)

    return [(cm.layout.layers[layer], "input", map_input(fn))]


@contextmanager
def ablate(cm: ChatModel, direction: Direction | torch.Tensor) -> Iterator[ChatModel]:
    """Directional ablation at every layer and position, generated tokens included."""
    with hooked(ablation_hooks(cm, direction)):
        yield cm


@contextmanager
def add(
    cm: ChatModel, direction: Direction | torch.Tensor, coeff: float = 1.0, layer: int | None = None
) -> Iterator[ChatModel]:
    """Activation addition of ``coeff * direction`` at ``layer`` (default: the direction's)."""
    with hooked(addition_hooks(cm, direction, coeff, layer)):
        yield cm
