"""An :class:`~refdir.interventions.edit.Edit` folded into the weights, and its parity with the
edit's hooks.

Every weight that writes into the residual stream becomes ``W - w Q^T Q W`` (its site's weight
``w``, the edit's orthonormal basis ``Q``, through a sandwich norm's scale where there is one),
a bias ``b - w Q^T Q b``, and the embedding rows ``E - w E Q^T Q``. A norm-preserving edit then
gives every column of an output projection (each input feature's write) and every embedding row
its original length. Arithmetic is float32, cast back once.

The weight edit equals the hooks exactly wherever the paper's orthogonalization equals its
ablation (the families of :mod:`refdir.interventions.orthogonalization`), for any weights and
any k, norm-preserving or not: every step is a linear map applied after (the projection) or
before (the per-feature scale) a weight, folded into it. Sandwich families stay approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.orthogonalization import (
    OrthogonalizeReport,
    check_editable,
    last_logits,
    logit_delta,
    measured_exactness,
    untie_embeddings,
)
from refdir.interventions.projection import column_scale, edited_copy, write_basis
from refdir.model.chat_model import ChatModel
from refdir.model.layout import ModelLayout

__all__ = ["edit_embedding", "edit_output_weight", "edit_parity", "edit_weights"]

_PROBES = (
    "Write a short poem about the sea.",
    "Explain how vaccines work in two sentences.",
)


def edit_embedding(weight: torch.Tensor, basis: torch.Tensor, w: float, keep: bool) -> None:
    """Rows [V, d]: E - w (E Q^T) Q, each row back at its length when ``keep``."""
    edited = edited_copy(weight, -1, basis, w)
    if keep:
        before = weight.detach().to(torch.float32, copy=True).norm(dim=-1, keepdim=True)
        after = edited.norm(dim=-1, keepdim=True)
        ok = after > 1e-12 * before
        edited = torch.where(ok, edited * (before / after.clamp_min(1e-30)), edited)
    weight.data.copy_(edited.to(weight.dtype))


def edit_output_weight(
    param: torch.Tensor, axis: int, basis: torch.Tensor, w: float, keep: bool
) -> None:
    """An output weight whose ``axis`` is the residual stream: W - w Q^T Q W, each input
    feature's column back at its length when ``keep``."""
    new = edited_copy(param, axis, basis, w)
    if keep:
        scale = column_scale(param, axis, basis, w).to(new.device)
        new = new * (scale.unsqueeze(0) if axis == -2 else scale.unsqueeze(1))
    param.data.copy_(new.to(param.dtype))


def edit_weights(cm: ChatModel, edit: Edit) -> OrthogonalizeReport:
    """Fold ``edit`` into ``cm.model``'s weights, in place."""
    edit.check(cm.layout)
    check_editable(cm)
    untied = untie_embeddings(cm) if edit.embed > 0 else False
    edited = 0
    with torch.no_grad():
        if edit.embed > 0:
            for embedding in cm.layout.embeddings:
                edit_embedding(embedding.weight, edit.basis, edit.embed, edit.norm_preserving)
                edited += 1
        for index, write, w in edit.sites(cm.layout):
            basis = write_basis(cm.layout, write, edit.basis_at(index))
            for weight in write.weights:
                edit_output_weight(weight.param, weight.axis, basis, w, edit.norm_preserving)
                edited += 1
                if weight.bias is not None:
                    edit_output_bias(getattr(weight.module, weight.bias).data, basis, w)
                    edited += 1
    exact, note = edit_exactness(cm.layout)
    return OrthogonalizeReport(exact, untied, edited, note)


def edit_parity(
    cm: ChatModel, edit: Edit, prompts: Sequence[str] = _PROBES
) -> tuple[OrthogonalizeReport, float]:
    """Fold ``edit`` into the weights in place and return the report and the max |logit
    difference| against the edit's hooks on ``prompts``. A float32 edit the layout says is
    exact but that differs from the hooks by more than rounding (1e-4 of the largest logit) is
    reported as approximate, with the measurement as the reason."""
    edit.check(cm.layout)
    check_editable(cm)
    with edit.apply(cm):
        hooked_logits = last_logits(cm, prompts)
    report = edit_weights(cm, edit)
    edited_logits = last_logits(cm, prompts)
    mask = cm.chat.encode(list(prompts)).attention_mask
    delta, scale = logit_delta(mask, hooked_logits, edited_logits)
    if not torch.isfinite(torch.tensor(delta)):
        raise RefdirError("the edited model's logits are not finite; the edit is too strong")
    dtype = cm.layout.embed.weight.dtype
    return measured_exactness(report, dtype, delta, scale, "the edit's hooks"), delta


def edit_output_bias(bias: torch.Tensor, basis: torch.Tensor, w: float) -> None:
    """A writer's bias edited in place as its weight is (``w`` of the subspace removed)."""
    bias.copy_(edited_copy(bias, -1, basis, w).to(bias.dtype))


def edit_exactness(layout: ModelLayout) -> tuple[bool, str]:
    """Whether a weighted edit folded into a model of ``layout`` equals its hooks, and why."""
    if not layout.sandwich:
        return True, "exact: projections write straight into the residual stream"
    return False, (
        "approximate: a norm after attention and after the MLP rescales their output; the "
        "edit removes the subspace from the norm's output, but not as the hooks do"
    )
