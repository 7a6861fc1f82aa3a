"""Weight orthogonalization: edit the weights so that nothing can write along the direction,
then export an ordinary checkpoint.

For a unit direction r, every matrix W that writes into the residual stream becomes
W - r r^T W (and a bias b becomes b - (b . r) r); the embedding rows lose their r component.
Arithmetic is float32, cast back once.

* Exact (equal to hook ablation up to float error): families whose mixer and MLP outputs
  are added to the residual stream directly (Llama, Qwen, Mistral, Phi-3, Gemma, MoE with
  fused or per-expert weights and biases, hybrid attention/state-space layers, GPT-2's
  ``Conv1D`` and learned positions). A tied unembedding is untied first so that the logits keep
  their original read-out.
* Approximate: sandwich-norm families (Gemma 2 and 3, OLMo 2, GLM-4), where a norm sits
  between the projection and the residual add. There the projections are orthogonalized
  against ``g * r`` (g the norm's elementwise scale), which makes the norm's output orthogonal
  to r exactly, but the norm's rescaling differs from hook ablation's. :func:`parity` measures
  the difference (the export records it), and reports as approximate any edit that was meant
  to be exact but is not (BLOOM's embedding norm).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.intervention import ablate
from refdir.model.chat_model import ChatModel
from refdir.model.layout import ModelLayout, effective_norm_scale
from refdir.model.layout_check import leftover, residuals, rounding_limit

__all__ = [
    "BLOCK_VALUES",
    "OrthogonalizeReport",
    "check_editable",
    "edit_bias",
    "edit_output",
    "edit_rows",
    "judged",
    "last_logits",
    "logit_delta",
    "measured_exactness",
    "orthogonalize",
    "parity",
    "unit_vector",
    "untie_embeddings",
    "write_direction",
]

_PROBES = (
    "Write a short poem about the sea.",
    "Explain how vaccines work in two sentences.",
)


@dataclass(frozen=True)
class OrthogonalizeReport:
    exact: bool
    untied_embeddings: bool
    edited_tensors: int
    note: str
    residual_left: float | None = None
    """Measured by :func:`parity`: the most that any layer of the edited model still writes along
    the direction (:func:`refdir.model.layout_check.leftover`, on the probe prompts); rounding in a
    correct edit."""


BLOCK_VALUES = 2**22
"""The most float32 values a weight edit computes at once (16 MB): a weight is edited in blocks
of rows, so the edit needs little memory beyond the weight itself. Each block is computed on
a fresh float32 copy: the blocks depend on the weight's shape only and their memory is aligned
(a weight mapped from a file may not be, and BLAS rounds unaligned data differently), so an
edit in memory and a streamed one round alike."""


def _row_blocks(w: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views [n, d] of ``w`` [..., d] that cover it, each of at most :data:`BLOCK_VALUES`
    values (one row at least)."""
    if w.dim() > 2:
        for part in w:
            yield from _row_blocks(part)
        return
    rows = max(1, BLOCK_VALUES // max(1, w.shape[-1]))
    for start in range(0, w.shape[0], rows):
        yield w[start : start + rows]


def edit_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """Embedding [V, d]: W - (W r) r^T, in float32, cast back."""
    edit_output(weight, r, -1)


def edit_output(weight: torch.Tensor, u: torch.Tensor, axis: int) -> None:
    """A weight whose ``axis`` is the residual stream (Linear [d, in], Conv1D [in, d], fused
    experts [E, d, in] or [E, in, d]): W - u (u^T W) along that axis, in float32, cast back,
    a block of rows at a time."""
    for block in _row_blocks(weight.data.movedim(axis, -1)):
        w = block.to(torch.float32, copy=True)
        block.copy_((w - torch.outer(w @ u, u)).to(block.dtype))


def edit_bias(bias: torch.Tensor, u: torch.Tensor) -> None:
    """A bias [d] or fused experts' biases [E, d]: b - (b . u) u."""
    b = bias.data.to(torch.float32, copy=True)
    bias.data.copy_((b - (b @ u).unsqueeze(-1) * u).to(bias.dtype))


def untie_embeddings(cm: ChatModel) -> bool:
    """Give the unembedding its own copy of the weights so the embedding edit leaves it alone."""
    unembed = cm.layout.unembed
    if unembed is None or not cm.layout.tied:
        return False
    unembed.weight = nn.Parameter(cm.layout.embed.weight.detach().clone())
    for config in {id(c): c for c in (cm.model.config, cm.model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def check_editable(cm: ChatModel) -> None:
    """Every weight to edit must be a plain floating-point tensor with a d_model axis: quantized
    weights (packed integers) can be hooked but not orthogonalized."""
    weights = [e.weight for e in cm.layout.embeddings]
    weights += [w.param for layer in cm.layout.per_layer for x in layer.writes for w in x.weights]
    for weight in weights:
        if not weight.is_floating_point() or cm.d_model not in weight.shape:
            raise RefdirError(
                f"{cm.name} has quantized weights ({weight.dtype}, shape {list(weight.shape)}), "
                "which cannot be orthogonalized; load the model in 16- or 32-bit"
            )


def orthogonalize(cm: ChatModel, direction: Direction | torch.Tensor) -> OrthogonalizeReport:
    """Edit ``cm.model`` in place so that no weight writes along ``direction``."""
    vector = direction.vector if isinstance(direction, Direction) else direction
    if isinstance(direction, Direction):
        direction.fits(cm.layout)
    elif vector.shape != (cm.d_model,):
        raise RefdirError(f"direction has shape {tuple(vector.shape)}, expected ({cm.d_model},)")
    r = unit_vector(vector)
    check_editable(cm)
    untied = untie_embeddings(cm)
    device_r = r.to(cm.layout.embed.weight.device)
    with torch.no_grad():
        for embedding in cm.layout.embeddings:
            edit_rows(embedding.weight, device_r.to(embedding.weight.device))
        edited = len(cm.layout.embeddings)
        for layer in cm.layout.per_layer:
            for write in layer.writes:
                u = write_direction(cm, write.norm, r)
                for weight in write.weights:
                    param = weight.param
                    edit_output(param, u.to(param.device), weight.axis)
                    edited += 1
                    if weight.bias is not None:
                        edit_bias(getattr(weight.module, weight.bias), u.to(param.device))
                        edited += 1
    exact, note = orthogonalized_exactness(cm.layout)
    return OrthogonalizeReport(exact, untied, edited, note)


def unit_vector(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` at length 1: normalised in float64, float32."""
    r = vector.detach().double()
    return (r / r.norm()).float()


def write_direction(cm: ChatModel, norm: nn.Module | None, r: torch.Tensor) -> torch.Tensor:
    """The direction to remove from a write's weights: ``r``, or ``g * r`` normalised when a
    norm with elementwise scale ``g`` sits between the weights and the residual stream."""
    if norm is None:
        return r
    g = effective_norm_scale(norm, cm.d_model)
    u = g.double() * r.double().cpu()
    return (u / u.norm()).float()


def last_logits(cm: ChatModel, prompts: Sequence[str]) -> torch.Tensor:
    batch = cm.chat.encode(prompts).to(cm.device)
    with torch.inference_mode():
        out = cm.model(**batch.inputs(), use_cache=False)
    return out.logits.float()


def parity(
    cm: ChatModel, direction: Direction | torch.Tensor, prompts: Sequence[str] = _PROBES
) -> tuple[OrthogonalizeReport, float]:
    """Orthogonalize in place and return the report and max |logit difference| against hook
    ablation, both measured on ``prompts``.

    The report records what the edited model still writes along the direction
    (``residual_left``). An edit that leaves more than rounding is not an orthogonalization:
    :func:`~refdir.interventions.export.export_orthogonalized` refuses it. A float32 edit the layout says is exact but that
    differs from hook ablation by more than rounding (1e-4 of the largest logit) is reported as
    approximate, with the measurement as the reason. In 16-bit types the difference is only
    recorded: rounding there can flip an MoE router's choice of experts."""
    check_editable(cm)  # before the passes
    vector = direction.vector if isinstance(direction, Direction) else direction
    unit = (vector.detach().double() / vector.detach().double().norm()).float().cpu()
    batch = cm.chat.encode(list(prompts))
    base = residuals(cm, batch)
    with ablate(cm, direction):
        hooked_logits = last_logits(cm, prompts)
    report = orthogonalize(cm, direction)
    edited_logits = last_logits(cm, prompts)
    left = leftover(residuals(cm, batch), unit, base)
    delta, scale = logit_delta(batch.attention_mask, hooked_logits, edited_logits)
    dtype = cm.layout.embed.weight.dtype
    return judged(report, left, delta, scale, dtype, type(cm.model).__name__), delta


def judged(
    report: OrthogonalizeReport,
    left: Sequence[float],
    delta: float,
    scale: float,
    dtype: torch.dtype,
    family: str,
) -> OrthogonalizeReport:
    """``report`` with what :func:`parity` measured: ``left`` (:func:`leftover` per site) as
    its ``residual_left``, made not orthogonal when that is more than rounding, else judged
    exact or approximate by the logit difference ``delta`` (largest logit ``scale``)."""
    report = replace(report, residual_left=max(left))
    if max(left) > rounding_limit(dtype):
        site = next(i for i, share in enumerate(left) if share > rounding_limit(dtype))
        place = f"layer {site - 1}" if site > 0 else "the embedding"
        note = (
            f"not orthogonal: the edited weights still write {max(left):.2g} of the direction "
            f"into the residual stream, first at {place}: {family} writes "
            "through a part refdir does not edit"
        )
        return replace(report, exact=False, note=note)
    return measured_exactness(report, dtype, delta, scale, "hook ablation")


def logit_delta(
    attention_mask: torch.Tensor, hooked: torch.Tensor, edited: torch.Tensor
) -> tuple[float, float]:
    """The largest |logit difference| between hooks and edited weights over the real (unpadded)
    positions, and the largest hooked logit there, its scale."""
    mask = attention_mask.bool().to(hooked.device)
    return float((hooked - edited).abs()[mask].max()), float(hooked[mask].abs().max())


def measured_exactness(
    report: OrthogonalizeReport, dtype: torch.dtype, delta: float, scale: float, against: str
) -> OrthogonalizeReport:
    """``report``, made approximate when a float32 (or float64) edit the layout says is exact
    differs from ``against`` by more than rounding (1e-4 of the largest logit); in 16-bit types
    the difference is only recorded."""
    if report.exact and dtype in (torch.float32, torch.float64) and delta > 1e-4 * scale:
        note = (
            f"approximate (measured): the edited weights differ from {against} by up to "
            f"{delta:.3g} in the logits (largest logit {scale:.3g})"
        )
        return replace(report, exact=False, note=note)
    return report


def orthogonalized_exactness(layout: ModelLayout) -> tuple[bool, str]:
    """Whether orthogonalizing a model of ``layout`` equals hook ablation, and why."""
    if not layout.sandwich:
        return True, "exact: projections write straight into the residual stream"
    return False, (
        "approximate: a norm after attention and after the MLP rescales their output; the "
        "edit keeps the norm's output orthogonal to the direction, but not equal to hook ablation"
    )
