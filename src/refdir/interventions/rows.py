"""Interventions that differ from row to row of a batch (:class:`RowConditions`), so that the
completions of several conditions decode in the same batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refdir.errors import RefdirError
from refdir.interventions.intervention import Intervention
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import (
    DeviceCopies,
    Hook,
    map_input,
    map_sites,
    project_out,
    rows_view,
)

__all__ = ["RowConditions"]


class RowConditions:
    """Interventions that differ from row to row of a batch, so that several conditions can
    share forward passes: a row of variant ``v`` runs ``conditions[v]``. Tell it the variant of
    every row in flight (:meth:`select`, the ``on_batch`` of
    :func:`~refdir.model.generation.generate_ids`) before each forward pass.

    Each row gets what :meth:`Intervention.apply` would give it alone, computed by the same
    operations; rows of other conditions pass through unchanged. The conditions that change
    anything share one direction, and the ``actadd`` ones one layer.
    """

    def __init__(self, cm: ChatModel, conditions: Sequence[Intervention]) -> None:
        self.cm = cm
        self.vector: torch.Tensor | None = None
        self.layer = 0
        self.edit: Intervention | None = None
        edits = [c for c in conditions if c.kind == "edit"]
        if edits:
            if len(conditions) != 1:
                raise RefdirError(
                    "an edit decodes in batches of its own; evaluate it in a call of its own"
                )
            self.edit = edits[0]
        active = [c for c in conditions if c.kind not in ("none", "edit")]
        if active:
            vectors = [c.vector(cm.layout) for c in active]  # a Direction is never zero
            if any(not torch.equal(v, vectors[0]) for v in vectors[1:]):
                raise RefdirError(
                    "conditions decoded together must share one direction; evaluate the "
                    "others in a call of their own"
                )
            layers = {c.at_layer for c in active if c.kind == "actadd"}
            if len(layers) > 1:
                raise RefdirError(
                    f"the actadd conditions decoded together add at layers {sorted(layers)}; "
                    "give them one layer"
                )
            self.vector = vectors[0]
            self.layer = layers.pop() if layers else 0
        kinds = [c.kind for c in conditions]
        self.ablated = torch.tensor([float(k == "ablate") for k in kinds])
        self.coeffs = torch.tensor(
            [float(c.coeff) if c.kind == "actadd" else 0.0 for c in conditions]
        )
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
        if self.edit is not None:  # alone in its batches
            return self.edit.hooks(self.cm)
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
