"""Scoped interventions on the residual stream: directional ablation and activation addition.

    with ablate(cm, direction):
        completions = generate(cm, prompts)

Both validate their arguments before any hook is registered, and remove every hook on exit,
exceptions included. Scopes nest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from refdir.chat import PromptBatch
from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.hooks import (
    DeviceCopies,
    Hook,
    TensorMap,
    hooked,
    map_input,
    map_sites,
    residual_stream,
    rows_view,
)
from refdir.model import ChatModel

__all__ = [
    "INTERVENTIONS",
    "RowConditions",
    "ablate",
    "ablation_hooks",
    "add",
    "addition_hooks",
    "leftover",
    "project_out",
    "residuals",
    "rounding_limit",
    "verify_ablation",
]


INTERVENTIONS: tuple[str, ...] = ("none", "ablate", "actadd")
"""The interventions a run, an evaluation or :class:`RowConditions` applies."""


def _vector(direction: Direction | torch.Tensor, cm: ChatModel) -> torch.Tensor:
    if isinstance(direction, Direction):
        direction.check(cm.d_model, cm.n_layers)
        return direction.vector.detach().float()
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1:
        raise RefdirError(
            "a direction must be a Direction or a 1-D tensor; pass cands.direction(position, "
            "layer) or one vector of the model's d_model values"
        )
    if direction.shape[0] != cm.d_model:
        raise RefdirError(
            f"direction has size {direction.shape[0]} but the model's residual stream has "
            f"{cm.d_model}; extract a direction from this model"
        )
    return direction.detach().float()


def project_out(unit: torch.Tensor) -> TensorMap:
    """x -> x - (x . r) r for a unit vector r, computed in float32 and cast back."""
    copies = DeviceCopies(unit)

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = copies.on(x.device)
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
    return map_sites(cm.layout.residual_writes, fn)


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
    copies = DeviceCopies(coeff * vector)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x.float() + copies.on(x.device)).to(x.dtype)

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


_VERIFY_PROMPTS = ("Hello there.", "Write a short poem about the sea.")


def residuals(cm: ChatModel, batch: PromptBatch) -> list[torch.Tensor]:
    """The residual stream entering every layer and leaving the last, at the batch's real
    tokens: one float32 [tokens, d] tensor per site."""
    sites: dict[int, torch.Tensor] = {}
    mask = batch.attention_mask.bool()

    def keep(index: int, hidden: torch.Tensor) -> None:
        if tuple(hidden.shape[:2]) != tuple(mask.shape) or hidden.shape[-1] != cm.d_model:
            raise RefdirError(
                f"{type(cm.model).__name__} passes its layers a residual stream of shape "
                f"{tuple(hidden.shape)}, not [batch, tokens, {cm.d_model}]: refdir cannot hook "
                "this family (several streams per token, or another layout)"
            )
        sites[index] = hidden.detach().float().cpu()[mask]

    with torch.inference_mode(), hooked(residual_stream(cm.layout.layers, keep)):
        cm.model(**batch.to(cm.device).inputs(), use_cache=False, logits_to_keep=1)
    return [sites[i] for i in sorted(sites)]


def leftover(
    residuals: Sequence[torch.Tensor], unit: torch.Tensor, base: Sequence[torch.Tensor]
) -> list[float]:
    """What each layer adds along ``unit`` to ``residuals`` (the first site: what it holds),
    per token as a share of what a random direction sees of that token's residual stream
    without the intervention (its norm over sqrt(d), the larger of the layer's input and
    output), the largest over tokens: about the size
    of a layer's writes for a direction nothing removes, the level of one layer's rounding for
    one that ablation removes. Measured per layer, so rounding does not pile up with depth, and
    per token, so a token with a very large residual stream (an attention sink) does not hide a
    miss. Meant for random directions: along a direction that a few large features dominate,
    rounding in those features would count for more."""
    scale = unit.shape[0] ** 0.5
    along = [h @ unit for h in residuals]
    steps = [along[0], *(b - a for a, b in itertools.pairwise(along))]
    norms = [b.norm(dim=-1) for b in base]
    # a layer that cancels a large feature rounds on the scale of its input, not its output
    widest = [norms[0], *(torch.maximum(a, b) for a, b in itertools.pairwise(norms))]
    return [
        float((step.abs() * scale / n.clamp(min=1e-30)).max())
        for step, n in zip(steps, widest, strict=True)
    ]


def rounding_limit(dtype: torch.dtype) -> float:
    """The most :func:`leftover` that rounding explains in a model of this dtype."""
    return _LIMITS.get(dtype, 1e-3)


_LIMITS = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
"""What rounding leaves (see :func:`verify_ablation`); 1e-3 for float32 and float64."""


def verify_ablation(cm: ChatModel, prompts: Sequence[str] = _VERIFY_PROMPTS) -> float:
    """Check on the model itself that :func:`ablate` removes a direction from the residual
    stream everywhere: at the input of every layer and the output of the last, at every token.

    Two seeded random directions are ablated (random, so that no few large features dominate
    them). What each layer adds along each (:func:`leftover`) must be at the level of rounding:
    1e-3 in float32, 5e-3 in float16, 3e-2 in bfloat16. Measured on random Llama models of 3–48
    layers, plain, with one token's residual stream 30 times the others' and with three of its
    features at 100 (as in trained models' first token), a correct layout leaves about 1e-6,
    1e-3 and 1e-2 at any depth, and one MLP left unhooked at least 0.07 at its layer. Returns
    the largest share; raises a one-line error naming the first site over the limit otherwise.
    """
    batch = cm.chat.encode(list(prompts))
    base = residuals(cm, batch)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(2, cm.d_model, generator=generator, dtype=torch.float64)
    limit = rounding_limit(cm.layout.embed.weight.dtype)
    shares = [0.0] * len(base)
    for vector in directions:
        unit = (vector / vector.norm()).float()
        with ablate(cm, unit):
            left = leftover(residuals(cm, batch), unit, base)
        shares = [max(a, b) for a, b in zip(shares, left, strict=True)]
    over = [site for site, share in enumerate(shares) if not share <= limit]
    if over:
        site = over[0]
        place = f"the input of layer {site}" if site < cm.n_layers else "the last layer's output"
        raise RefdirError(
            f"ablation leaves {shares[site]:.2g} of the direction in the residual stream of "
            f"{type(cm.model).__name__} from {place} on: a block before it writes into the "
            "residual stream without being found; name every such block with --layout FILE.json "
            "(in Python, load_model(..., layout_spec=LayoutSpec(...))), see docs/orthogonalization.md"
        )
    return max(shares)


class RowConditions:
    """Interventions that differ from row to row of a batch, so that several conditions can
    share forward passes: a row of variant ``v`` runs ``conditions[v]``, one of ``("none", _)``,
    ``("ablate", _)`` (the direction projected out everywhere) or ``("actadd", coeff)``
    (``coeff`` x direction added to its layer's input). Tell it the variant of every row in
    flight (:meth:`select`, the ``on_batch`` of :func:`~refdir.generation.generate_ids`) before
    each forward pass.

    Each row gets what :func:`ablate` or :func:`add` would give it alone, computed by the
    same operations; rows of other conditions pass through unchanged.
    """

    def __init__(
        self,
        cm: ChatModel,
        direction: Direction | None,
        conditions: Sequence[tuple[str, float]],
    ) -> None:
        kinds = [kind for kind, _ in conditions]
        unknown = sorted({k for k in kinds if k not in INTERVENTIONS})
        if unknown:
            raise RefdirError(f"unknown intervention {unknown[0]!r}; use none, ablate or actadd")
        self.cm = cm
        self.vector: torch.Tensor | None = None
        self.layer = 0
        if any(k != "none" for k in kinds):
            if direction is None:
                raise RefdirError("ablate and actadd need a direction")
            self.vector = _vector(direction, cm)  # a Direction is never zero or non-finite
            self.layer = direction.layer
        self.ablated = torch.tensor([float(k == "ablate") for k in kinds])
        self.coeffs = torch.tensor([float(c) if k == "actadd" else 0.0 for k, c in conditions])
        self.rows = torch.zeros(0, dtype=torch.long)
        # each row's values in the batch in flight, shaped to broadcast over [batch, tokens, d]
        self._ablated_rows = DeviceCopies(self.ablated[self.rows][:, None, None])
        self._coeff_rows = DeviceCopies(self.coeffs[self.rows][:, None, None])

    def select(self, variants: torch.Tensor) -> None:
        """The variant of each row of the next forward pass, in batch order."""
        self.rows = variants.detach().long().cpu()
        self._ablated_rows.set(self.ablated[self.rows][:, None, None])
        self._coeff_rows.set(self.coeffs[self.rows][:, None, None])

    def _rows_where(self, values: DeviceCopies, x: torch.Tensor) -> torch.Tensor:
        """``values`` of each row in flight, on ``x``'s device."""
        if self.rows.shape[0] != x.shape[0]:
            raise RefdirError("the rows' variants do not match the batch in flight")
        return values.on(x.device)

    def hooks(self) -> list[Hook]:
        """The hooks to register (none when no condition changes anything). Rows whose
        condition leaves a hook's tensor alone get it back untouched (``torch.where``)."""
        if self.vector is None:
            return []
        vector = self.vector
        hooks: list[Hook] = []
        if bool(self.ablated.any()):
            ablation = project_out(vector / vector.norm())

            def project(x: torch.Tensor) -> torch.Tensor:
                xr = rows_view(x, self.rows.shape[0])  # MoE outputs may come flattened
                ablated = self._rows_where(self._ablated_rows, xr) > 0
                return torch.where(ablated, ablation(xr), xr).view(x.shape)

            hooks += map_sites(self.cm.layout.residual_writes, project)
        if bool(self.coeffs.ne(0).any()):
            copies = DeviceCopies(vector)

            def shift(x: torch.Tensor) -> torch.Tensor:
                v = copies.on(x.device)
                coeff = self._rows_where(self._coeff_rows, x)
                xf = x.float()
                return torch.where(coeff != 0, xf + coeff * v, xf).to(x.dtype)

            hooks.append((self.cm.layout.layers[self.layer], "input", map_input(shift)))
        return hooks
