"""Export an orthogonalized model: an ordinary safetensors checkpoint with its tokenizer, the
direction it no longer writes along, and a manifest (``refdir_manifest.json``) that records
whether the edit equals hook ablation and the measured difference."""

from __future__ import annotations

from pathlib import Path

from refdir.artifacts.export import ExportManifest, ManifestDirection
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.orthogonalization import parity
from refdir.io import atomic_folder, writable_folder
from refdir.model.chat_model import ChatModel
from refdir.model.layout_check import rounding_limit

__all__ = ["check_export_folder", "export_orthogonalized"]


def check_export_folder(out: Path) -> Path:
    """``out``, once it is known to be a new or empty folder in a writable place."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RefdirError(f"{out} exists and is not an empty folder; choose a new `out` folder")
    writable_folder(out.parent)
    return out


def export_orthogonalized(cm: ChatModel, direction: Direction, out: str | Path) -> ExportManifest:
    """Orthogonalize ``cm`` in place, then write it with its tokenizer, the direction and a
    manifest to ``out`` atomically (a temporary folder renamed at the end)."""
    out = check_export_folder(Path(out))  # fail now, not after the edit
    report, delta = parity(cm, direction)
    left = report.residual_left
    if left is None or left > rounding_limit(cm.layout.embed.weight.dtype):
        raise RefdirError(
            f"cannot export an orthogonalized {cm.name} (its weights in memory are edited; "
            f"load it again to use it): {report.note}"
        )
    manifest = ExportManifest(
        source_model=cm.name,
        source_revision=cm.revision,
        direction=ManifestDirection(
            layer=direction.layer, position=direction.position, norm=direction.norm
        ),
        exact=report.exact,
        untied_embeddings=report.untied_embeddings,
        edited_tensors=report.edited_tensors,
        note=report.note,
        residual_left=report.residual_left,
        parity_max_abs_logit_delta=delta,
        parity_dtype=str(cm.layout.embed.weight.dtype).removeprefix("torch."),
    )
    with atomic_folder(out) as tmp:
        cm.model.save_pretrained(tmp, safe_serialization=True)
        cm.tokenizer.save_pretrained(tmp)
        direction.save(tmp)
        manifest.write(tmp)
    return manifest
