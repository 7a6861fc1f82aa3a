"""Hook scopes that cannot leak: everything is validated before this is entered, hooks are
registered inside ``try`` and removed in ``finally``; scopes nest. Hook functions never edit
the caller's tensors in place: they return new ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from refdir.errors import RefdirError

__all__ = [
    "DeviceCopies",
    "Hook",
    "TensorMap",
    "hooked",
    "map_input",
    "map_output",
    "map_sites",
    "project_out",
    "residual_stream",
    "rows_view",
]

TensorMap = Callable[[torch.Tensor], torch.Tensor]
Hook = tuple[nn.Module, Literal["input", "output"], Callable[..., Any]]


class DeviceCopies:
    """A tensor that hooks read, copied once to each device that asks for it (the layers of a
    model spread over GPUs run on several), not at every hook call. ``set`` replaces it (and
    drops the copies), for values that change from one batch to the next."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.set(tensor)

    def set(self, tensor: torch.Tensor) -> None:
        self._copies = {tensor.device: tensor}

    def on(self, device: torch.device) -> torch.Tensor:
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = next(iter(self._copies.values())).to(device)
        return copy


def project_out(unit: torch.Tensor) -> TensorMap:
    """x -> x - (x . r) r for a unit vector r, computed in float32 and cast back."""
    copies = DeviceCopies(unit)

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = copies.on(x.device)
        xf = x.float()
        return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)

    return fn


def map_output(fn: TensorMap) -> Callable[..., Any]:
    """A forward hook that replaces a module's output (or the first item of a tuple output)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (fn(output[0]), *output[1:])
        raise TypeError(
            f"cannot hook the output of {type(module).__name__}: {type(output).__name__}"
        )

    return hook


def map_input(fn: TensorMap) -> Callable[..., Any]:
    """A forward pre-hook (with kwargs) that replaces a layer's ``hidden_states`` input."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            return (fn(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        raise TypeError(f"cannot find the hidden states passed to {type(module).__name__}")

    return hook


def rows_view(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` as [rows, tokens, d], for hooks that treat each row of a batch differently: a block
    that returns its output with the batch flattened ([rows * tokens, d], as Llama 4's MoE
    does) is viewed per row."""
    if x.dim() == 3 and x.shape[0] == rows:
        return x
    if x.dim() == 2 and rows > 0 and x.shape[0] % rows == 0:
        return x.view(rows, -1, x.shape[-1])
    raise RefdirError(f"cannot split a block output of shape {tuple(x.shape)} into {rows} rows")


def map_sites(
    sites: Sequence[tuple[nn.Module, Literal["input", "output"]]], fn: TensorMap
) -> list[Hook]:
    """Hooks that apply ``fn`` at each (module, "input" or "output") site."""
    return [(m, kind, map_input(fn) if kind == "input" else map_output(fn)) for m, kind in sites]


def residual_stream(
    layers: Sequence[nn.Module] | nn.ModuleList, keep: Callable[[int, torch.Tensor], None]
) -> list[Hook]:
    """Read-only hooks that hand the residual stream to ``keep(index, hidden)``: index ``i`` is
    the input of ``layers[i]``, index ``len(layers)`` the output of the last layer."""

    def layer_input(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep(index, args[0] if args else kwargs["hidden_states"])

        return hook

    modules = list(layers)

    def last_output(module: nn.Module, args: Any, output: Any) -> None:
        keep(len(modules), output if isinstance(output, torch.Tensor) else output[0])

    hooks: list[Hook] = [(layer, "input", layer_input(i)) for i, layer in enumerate(modules)]
    hooks.append((modules[-1], "output", last_output))
    return hooks


@contextmanager
def hooked(hooks: Sequence[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the duration of the block, and always remove them."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, kind, fn in hooks:
            if kind == "output":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
