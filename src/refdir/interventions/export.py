"""Export an orthogonalized (or edited) model in one of three forms: an ordinary safetensors
checkpoint with its tokenizer, a PEFT LoRA adapter on the unedited base
(:mod:`refdir.interventions.lora_export`), or one GGUF file that keeps the source GGUF's
metadata and tokenizer (:mod:`refdir.interventions.gguf_export`). Each folder also holds the
direction, a manifest (``refdir_manifest.json``) that records whether the export equals hook
ablation and the measured difference, and a model card (``README.md``,
:mod:`refdir.interventions.model_card`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from refdir.artifacts.export import ExportManifest, ManifestDirection
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.edit_weights import edit_parity
from refdir.interventions.gguf_export import (
    check_gguf_type,
    gguf_license,
    gguf_model_file,
    write_gguf,
)
from refdir.interventions.lora_export import adapter_parity
from refdir.interventions.model_card import CARD_FILE, base_model_id, card_license, model_card
from refdir.interventions.orthogonalization import OrthogonalizeReport, parity
from refdir.io import atomic_folder, check_room, writable_folder, write_text
from refdir.model.chat_model import ChatModel
from refdir.model.layout_check import rounding_limit
from refdir.organism.load import gguf_location

__all__ = [
    "FORMATS",
    "ExportOptions",
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


def check_export_room(cm: ChatModel, out: Path, options: ExportOptions | None = None) -> None:
    """A one-line error, before the edit, unless the export fits: the model's parameter bytes
    (in their dtype, as ``save_pretrained`` writes them) plus a margin on the disk under ``out``,
    and its largest shard under the process's file-size limit."""
    seen: set[int] = set()
    weights = 0
    for tensor in [*cm.model.parameters(), *cm.model.buffers()]:
        if id(tensor) not in seen:  # a tied weight is written once
            seen.add(id(tensor))
            weights += tensor.numel() * tensor.element_size()
    if options is not None and options.format == "gguf":  # up to 4 bytes a weight (F32)
        per = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.1}.get(options.gguf_type.upper(), 4.0)
        total = int(sum(t.numel() for t in cm.model.parameters()) * per * 1.05)
        check_room(out, total + EXTRA_BYTES, (out / gguf_model_file(options.gguf_type), total))
        return
    shard = min(weights, SHARD_BYTES) + 256 * len(seen) + 4096  # and its header
    check_room(out, int(weights * 1.05) + EXTRA_BYTES, (out / "model.safetensors", shard))


Format = Literal["safetensors", "lora", "gguf"]
FORMATS: tuple[Format, ...] = ("safetensors", "lora", "gguf")


@dataclass(frozen=True)
class ExportOptions:
    """How an edit leaves refdir: ``format``; for GGUF the tensor type and the GGUF the model
    was loaded from (its metadata and tokenizer are kept); ``run``: the run folder the
    direction came from, whose figures the model card quotes."""

    format: Format = "safetensors"
    gguf_type: str = "F16"
    gguf_source: Path | None = None
    run: Path | None = None

    def check(self) -> None:
        """One-line errors for options that cannot work, before any model is loaded."""
        if self.format not in FORMATS:
            raise RefdirError(
                f"unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}"
            )
        check_gguf_type(self.gguf_type)
        if self.format == "gguf":
            if self.gguf_source is None:
                raise RefdirError(
                    "`--format gguf` keeps the metadata and tokenizer of the GGUF the model was "
                    "loaded from, and this model was not loaded from one; export with `--format "
                    "safetensors` and convert it with llama.cpp's convert_hf_to_gguf.py"
                )
            if not self.gguf_source.is_file():
                raise RefdirError(f"GGUF file {self.gguf_source} does not exist")


def _with_source(cm: ChatModel, options: ExportOptions | None) -> ExportOptions:
    """``options``, with the GGUF a GGUF export keeps the metadata of filled in where ``cm``
    names it: the organism's base, or a model loaded from a ``.gguf`` file."""
    options = options or ExportOptions()
    if options.format != "gguf" or options.gguf_source is not None:
        return options
    if cm.name == "organism":
        folder, name = gguf_location()
        return replace(options, gguf_source=folder / name)
    if cm.name.endswith(".gguf") and Path(cm.name).expanduser().is_file():
        return replace(options, gguf_source=Path(cm.name).expanduser())
    return options


def export_orthogonalized(
    cm: ChatModel,
    direction: Direction,
    out: str | Path,
    options: ExportOptions | None = None,
) -> ExportManifest:
    """Orthogonalize ``cm`` against ``direction`` and write it to ``out`` atomically (a
    temporary folder renamed at the end) in ``options.format``, with the direction, a manifest
    and a model card. The safetensors and GGUF exports edit ``cm`` in place; the LoRA export
    leaves it as it was."""
    options = _with_source(cm, options)
    options.check()
    out = check_export_folder(Path(out))  # fail now, not after the edit
    if options.format == "lora":
        ablation = Edit.ablation(direction, cm.n_layers)
        return _export_lora(cm, ablation, direction, out, options, None)
    check_export_room(cm, out, options)
    report, delta = parity(cm, direction)
    left = report.residual_left
    if left is None or left > rounding_limit(cm.layout.embed.weight.dtype):
        raise RefdirError(
            f"cannot export an orthogonalized {cm.name} (its weights in memory are edited; "
            f"load it again to use it): {report.note}"
        )
    return _write_export(cm, report, delta, direction, out, options)


def export_manifest(
    source: str,
    revision: str | None,
    report: OrthogonalizeReport,
    delta: float,
    dtype: torch.dtype,
    direction: Direction,
    edit: Edit | None = None,
    export_format: str = "safetensors",
    rank: int | None = None,
    gguf_type: str | None = None,
) -> ExportManifest:
    """The manifest of an export of ``source`` edited as ``report`` says, its parity ``delta``
    measured in ``dtype``, in ``export_format`` (safetensors is left unnamed, as in 0.1.0)."""
    return ExportManifest(
        format=None if export_format == "safetensors" else export_format,
        rank=rank,
        gguf_type=gguf_type,
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
            "per_layer": edit.layer_basis is not None,
        },
    )


def _manifest(
    cm: ChatModel,
    report: OrthogonalizeReport,
    delta: float,
    direction: Direction,
    options: ExportOptions,
    edit: Edit | None,
    rank: int | None = None,
) -> ExportManifest:
    return export_manifest(
        cm.name,
        cm.revision,
        report,
        delta,
        cm.layout.embed.weight.dtype,
        direction,
        edit,
        options.format,
        rank,
        check_gguf_type(options.gguf_type) if options.format == "gguf" else None,
    )


def _finish(
    cm: ChatModel,
    tmp: Path,
    manifest: ExportManifest,
    direction: Direction,
    edit: Edit | None,
    options: ExportOptions,
    files: list[str],
) -> None:
    """Beside the model files in ``tmp``: the edit, the direction, the manifest and the card."""
    if edit is not None and manifest.edit is not None:
        edit.save(tmp)
    direction.save(tmp)
    manifest.write(tmp)
    license_id = (
        gguf_license(options.gguf_source)
        if options.gguf_source is not None
        else card_license(Path(cm.name) if Path(cm.name).is_dir() else None)
    )
    if license_id is None and cm.name == "organism":  # its base's GGUF names the license
        folder, name = gguf_location()
        license_id = gguf_license(folder / name)
    card = model_card(
        manifest,
        direction,
        files,
        base_model=base_model_id(cm.name),
        license_id=license_id,
        run=options.run,
    )
    write_text(tmp / CARD_FILE, card)


def _write_export(
    cm: ChatModel,
    report: OrthogonalizeReport,
    delta: float,
    direction: Direction,
    out: Path,
    options: ExportOptions,
    edit: Edit | None = None,
) -> ExportManifest:
    """Write the edited ``cm`` (safetensors with its tokenizer, or GGUF), ``direction``, ``edit``
    (when there is one), the manifest of ``report`` and the card to ``out``, through a
    temporary folder renamed at the end."""
    manifest = _manifest(cm, report, delta, direction, options, edit)
    with atomic_folder(out) as tmp:
        if options.format == "gguf":
            assert options.gguf_source is not None  # ExportOptions.check
            name = gguf_model_file(options.gguf_type)
            write_gguf(cm, options.gguf_source, tmp / name, options.gguf_type)
            files = [name]
        else:
            cm.model.save_pretrained(tmp, safe_serialization=True)
            cm.tokenizer.save_pretrained(tmp)
            files = sorted(p.name for p in tmp.glob("*.safetensors"))
        _finish(cm, tmp, manifest, direction, edit, options, files)
    return manifest


def _export_lora(
    cm: ChatModel,
    edit: Edit,
    direction: Direction,
    out: Path,
    options: ExportOptions,
    weighted: Edit | None,
) -> ExportManifest:
    """``edit`` as a PEFT adapter in ``out`` (``cm`` is left unedited); the manifest records
    the adapter's parity with the edit's hooks, and ``weighted`` (a weighted edit, None for
    the paper's orthogonalization) beside it."""
    params = sum(p.numel() for p in cm.model.parameters())
    check_room(out, EXTRA_BYTES + 8 * edit.k * params // cm.d_model)  # A and B, float32
    with atomic_folder(out) as tmp:
        report, delta = adapter_parity(cm, edit, tmp)
        manifest = _manifest(cm, report, delta, direction, options, weighted, rank=edit.k)
        _finish(cm, tmp, manifest, direction, weighted, options, ["adapter_model.safetensors"])
    return manifest


def export_edit(
    cm: ChatModel,
    edit: Edit,
    direction: Direction,
    out: str | Path,
    options: ExportOptions | None = None,
) -> ExportManifest:
    """Fold ``edit`` into ``cm``'s weights in place (safetensors, GGUF) or write it as a LoRA
    adapter, with the edit (``edit.safetensors``), ``direction`` (the edit's direction with its
    layer and scale, for activation addition), a manifest and a card, to ``out`` atomically."""
    options = _with_source(cm, options)
    options.check()
    out = check_export_folder(Path(out))
    if options.format == "lora":
        return _export_lora(cm, edit, direction, out, options, edit)
    check_export_room(cm, out, options)
    report, delta = edit_parity(cm, edit)
    return _write_export(cm, report, delta, direction, out, options, edit)
