"""Export an orthogonalized model: an ordinary safetensors checkpoint with its tokenizer, the
direction it no longer writes along, and a manifest (``refdir_manifest.json``) that records
whether the edit equals hook ablation and the measured difference."""

from __future__ import annotations

from pathlib import Path

import torch

from refdir.artifacts.export import ExportManifest, ManifestDirection
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.edit_weights import edit_parity
from refdir.interventions.orthogonalization import OrthogonalizeReport, parity
from refdir.io import atomic_folder, check_room, writable_folder
from refdir.model.chat_model import ChatModel
from refdir.model.layout_check import rounding_limit

__all__ = [
    "check_export_folder",
    "check_export_room",
    "export_edit",
    "export_manifest",
    "export_orthogonalized",
]

SHARD_BYTES = 50 * 10**9
"""``save_pretrained``'s default largest shard (transformers 5: "50GB")."""

EXTRA_BYTES = 64 * 10**6
"""Beside the weights: the tokenizer's files, the config, the direction and the manifest."""


def check_export_folder(out: Path) -> Path:
    """``out``, once it is known to be a new or empty folder in a writable place."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RefdirError(f"{out} exists and is not an empty folder; choose a new `out` folder")
    writable_folder(out.parent)
    return out


def check_export_room(cm: ChatModel, out: Path) -> None:
    """A one-line error, before the edit, unless the export fits: the model's parameter bytes
    (in their dtype, as ``save_pretrained`` writes them) plus a margin on the disk under ``out``,
    and its largest shard under the process's file-size limit."""
    seen: set[int] = set()
    weights = 0
    for tensor in [*cm.model.parameters(), *cm.model.buffers()]:
        if id(tensor) not in seen:  # a tied weight is written once
            seen.add(id(tensor))
            weights += tensor.numel() * tensor.element_size()
    shard = min(weights, SHARD_BYTES) + 256 * len(seen) + 4096  # and its header
    check_room(out, int(weights * 1.05) + EXTRA_BYTES, (out / "model.safetensors", shard))


def export_orthogonalized(cm: ChatModel, direction: Direction, out: str | Path) -> ExportManifest:
    """Orthogonalize ``cm`` in place, then write it with its tokenizer, the direction and a
    manifest to ``out`` atomically (a temporary folder renamed at the end)."""
    out = check_export_folder(Path(out))  # fail now, not after the edit
    check_export_room(cm, out)
    report, delta = parity(cm, direction)
    left = report.residual_left
    if left is None or left > rounding_limit(cm.layout.embed.weight.dtype):
        raise RefdirError(
            f"cannot export an orthogonalized {cm.name} (its weights in memory are edited; "
            f"load it again to use it): {report.note}"
        )
    return _write_export(cm, report, delta, direction, out)


def export_manifest(
    source: str,
    revision: str | None,
    report: OrthogonalizeReport,
    delta: float,
    dtype: torch.dtype,
    direction: Direction,
    edit: Edit | None = None,
) -> ExportManifest:
    """The manifest of an export of ``source`` edited as ``report`` says, its parity ``delta``
    measured in ``dtype``."""
    return ExportManifest(
        source_model=source,
        source_revision=revision,
        direction=ManifestDirection(
            layer=direction.layer, position=direction.position, norm=direction.norm
        ),
        exact=report.exact,
        untied_embeddings=report.untied_embeddings,
        edited_tensors=report.edited_tensors,
        note=report.note,
        residual_left=report.residual_left,
        parity_max_abs_logit_delta=delta,
        parity_dtype=str(dtype).removeprefix("torch."),
        edit=None
        if edit is None
        else {
            **{k: v for k, v in edit.params.items() if isinstance(v, float | int | bool | str)},
            "k": edit.k,
            "norm_preserving": edit.norm_preserving,
        },
    )


def _write_export(
    cm: ChatModel,
    report: OrthogonalizeReport,
    delta: float,
    direction: Direction,
    out: Path,
    edit: Edit | None = None,
) -> ExportManifest:
    """Write the edited ``cm`` with its tokenizer, ``direction``, ``edit`` (when there is one)
    and the manifest of ``report`` to ``out``, through a temporary folder renamed at the end."""
    dtype = cm.layout.embed.weight.dtype
    manifest = export_manifest(cm.name, cm.revision, report, delta, dtype, direction, edit)
    with atomic_folder(out) as tmp:
        cm.model.save_pretrained(tmp, safe_serialization=True)
        cm.tokenizer.save_pretrained(tmp)
        if edit is not None:
            edit.save(tmp)
        direction.save(tmp)
        manifest.write(tmp)
    return manifest


def export_edit(cm: ChatModel, edit: Edit, direction: Direction, out: str | Path) -> ExportManifest:
    """Fold ``edit`` into ``cm``'s weights in place, then write the model with its tokenizer,
    the edit (``edit.safetensors``), ``direction`` (the edit's direction with its layer and
    scale, for activation addition) and a manifest to ``out`` atomically."""
    out = check_export_folder(Path(out))
    check_export_room(cm, out)
    report, delta = edit_parity(cm, edit)
    return _write_export(cm, report, delta, direction, out, edit)
