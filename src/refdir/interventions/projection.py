"""The linear algebra every edit shares: orthonormal bases, the subspace a write's weights must
lose (through a sandwich norm's scale), weights with a subspace removed, and the per-feature
scale that keeps a weight's columns at their length. Float64 where it decides, float32 edits."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from refdir.errors import RefdirError
from refdir.model.chat_model import ChatModel
from refdir.model.layout import ModelLayout, Write, effective_norm_scale, find_layout

__all__ = ["column_scale", "edited_copy", "layout_of", "orthonormal", "write_basis"]

_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, ModelLayout] = weakref.WeakKeyDictionary()


def layout_of(model: ChatModel | nn.Module) -> ModelLayout:
    """The residual-stream layout of ``model``: a ChatModel's own, else found by name (once per
    model; :func:`~refdir.model.layout_check.verify_ablation` checks it on a ChatModel)."""
    if isinstance(model, ChatModel):
        return model.layout
    if model not in _LAYOUTS:
        _LAYOUTS[model] = find_layout(model)
    return _LAYOUTS[model]


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows [k, d] spanning ``vectors`` [k, d] (QR in float64, the first row along
    the first vector), float32; a one-line error if they are dependent."""
    v = vectors.detach().double().cpu()
    if v.dim() != 2 or v.shape[0] < 1 or not torch.isfinite(v).all():
        raise RefdirError(f"an edit needs k >= 1 finite vectors [k, d], got {tuple(v.shape)}")
    q, r = torch.linalg.qr(v.T)
    diag = r.diagonal()
    if bool((diag.abs() <= 1e-9 * v.norm(dim=1).max()).any()):
        raise RefdirError("the edit's vectors are linearly dependent; give independent ones")
    q = q * diag.sign()  # the first row points along the first vector
    return q.T.contiguous().float()


def write_basis(layout: ModelLayout, write: Write, basis: torch.Tensor) -> torch.Tensor:
    """The subspace to remove from a write's weights: ``basis``, or, when a norm with
    elementwise scale ``g`` sits between the weights and the residual stream, an orthonormal
    basis of ``g * basis`` (which makes the norm's output orthogonal to the subspace)."""
    if write.norm is None:
        return basis
    g = effective_norm_scale(write.norm, layout.d_model)
    return orthonormal(g.double() * basis.double())


def edited_copy(weight: torch.Tensor, axis: int, basis: torch.Tensor, w: float) -> torch.Tensor:
    """``weight`` (any dtype) with the fraction ``w`` of its residual ``axis`` along the
    orthonormal rows of ``basis`` removed, float32: W - w Q^T (Q W) along that axis."""
    q = basis.to(device=weight.device, dtype=torch.float32)
    x = weight.detach().to(torch.float32, copy=True).movedim(axis, -1)  # aligned memory
    flat = x.reshape(-1, x.shape[-1])
    flat = flat - w * ((flat @ q.T) @ q)
    return flat.reshape(x.shape).movedim(-1, axis)


def column_scale(weight: torch.Tensor, axis: int, basis: torch.Tensor, w: float) -> torch.Tensor:
    """Per input feature (a slice across the residual ``axis``), ``|W_j| / |W'_j|`` for
    ``W' = W - w Q^T Q W``: the factor that gives the edited weight each feature's original
    length (1 where a feature wrote nothing, or nothing but the subspace). Float32 [features].

    With ``Q``'s rows orthonormal, ``|W'_j|^2 = |W_j|^2 - (2w - w^2) |Q W_j|^2``, so only the
    subspace's share of each column is computed, in float64."""
    if weight.dim() != 2:
        raise RefdirError(
            f"a norm-preserving edit needs 2-D output weights, got shape {list(weight.shape)} "
            "(fused experts); use norm_preserving=False"
        )
    x = weight.detach().to(torch.float64, copy=True).movedim(axis, -1)  # [features, d]
    q = basis.to(device=weight.device, dtype=torch.float64)
    before = (x * x).sum(-1)
    along = ((x @ q.T) ** 2).sum(-1)
    after = (before - (2 * w - w * w) * along).clamp_min(0.0)
    ok = (before > 0) & (after > 1e-12 * before)
    scale = torch.where(ok, (before / after.clamp_min(1e-300)).sqrt(), torch.ones_like(before))
    return scale.float()
