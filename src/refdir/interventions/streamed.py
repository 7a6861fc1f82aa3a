"""Edit a safetensors checkpoint on disk, one shard at a time, without loading the model.

The layout comes from the model built on the ``meta`` device from its config (no weights), the
tensors to edit from its parameter names. Each shard is then written under its own name one
tensor at a time: read, edited with the functions the in-memory edit uses (float32 in blocks of
rows, one cast back to the stored dtype), written, let go. The output's tensors are byte for
byte those of the in-memory export of the model loaded in its stored dtype. Memory: the largest
tensor, the float32 blocks of its edit (:data:`~refdir.interventions.orthogonalization.BLOCK_VALUES`),
the direction; never the model. A weighted :class:`~refdir.interventions.edit.Edit` computes
each edited tensor's float32 copy whole, as its in-memory export does.

The parity with hook ablation is measured as the in-memory export measures it, on the probe
prompts, with the source and the edited checkpoint each run from disk (accelerate's disk
offload: one module's weights in memory at a time). The manifest is the same.

Streamed editing needs the checkpoint's tensors under the model's own parameter names: a
checkpoint that transformers converts while loading (per-expert MoE weights it fuses) is
refused with a one-line error; edit it in memory.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from refdir.artifacts.export import ExportManifest
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.hf import load_failure
from refdir.interventions.edit import Edit
from refdir.interventions.edit_weights import (
    edit_embedding,
    edit_exactness,
    edit_output_bias,
    edit_output_weight,
)
from refdir.interventions.export import check_export_folder, export_manifest
from refdir.interventions.intervention import ablate
from refdir.interventions.model_card import CARD_FILE, base_model_id, card_license, model_card
from refdir.interventions.orthogonalization import (
    OrthogonalizeReport,
    check_editable,
    edit_bias,
    edit_output,
    edit_rows,
    judged,
    last_logits,
    logit_delta,
    measured_exactness,
    orthogonalized_exactness,
    unit_vector,
    write_direction,
)
from refdir.interventions.projection import write_basis
from refdir.io import atomic_folder, check_room, write_text
from refdir.model.chat_model import ChatModel
from refdir.model.layout_check import leftover, residuals, rounding_limit
from refdir.model.options import ModelOptions

__all__ = [
    "INDEX_FILE",
    "Checkpoint",
    "read_checkpoint",
    "stream_edit",
    "stream_orthogonalized",
    "streams_by_default",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_PROBES = (
    "Write a short poem about the sea.",
    "Explain how vaccines work in two sentences.",
)
"""The prompts parity is measured on: those of the in-memory export."""

_FILES_KEPT = ("generation_config.json",)
"""Files of the source folder the export carries over as they are (beside the config and the
tokenizer, which are written again)."""

TensorEdit = Callable[[torch.Tensor], None]
"""Edits a tensor read from a shard, in place."""


def streams_by_default(model: str) -> bool:
    """Whether ``refdir orthogonalize`` streams ``model`` unless told: a local folder of a
    sharded safetensors checkpoint (``model.safetensors.index.json``)."""
    return (Path(model).expanduser() / INDEX_FILE).is_file()


@dataclass(frozen=True)
class Checkpoint:
    """A local safetensors checkpoint: its folder and, per shard file, its tensors' names."""

    folder: Path
    shards: dict[str, list[str]]

    @property
    def where(self) -> dict[str, str]:
        """Tensor name -> its shard's file name."""
        return {name: shard for shard, names in self.shards.items() for name in names}

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard."""
        return _Shard.read(self.folder / self.where[name]).get(name)

    @property
    def nbytes(self) -> int:
        return sum((self.folder / shard).stat().st_size for shard in self.shards)


def read_checkpoint(folder: Path) -> Checkpoint:
    """The shards of the checkpoint in ``folder`` (its index, or one ``model.safetensors``);
    a one-line error when there is none."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(str(shard), []).append(str(name))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RefdirError(
                f"{index} is not a safetensors index ({exc}); save the model again"
            ) from None
    elif (folder / SINGLE_FILE).is_file():
        shards = {SINGLE_FILE: list(_Shard.read(folder / SINGLE_FILE).tensors)}
    else:
        raise RefdirError(
            f"{folder} holds no safetensors checkpoint ({INDEX_FILE} or {SINGLE_FILE}); "
            "streamed editing needs a local folder saved with save_pretrained"
        )
    for shard in shards:
        if Path(shard).name != shard or not (folder / shard).is_file():
            raise RefdirError(f"{folder} lacks the shard {shard} its index names; copy it again")
    return Checkpoint(folder, shards)


def _meta_model(options: ModelOptions) -> ChatModel:
    """The model of ``options.model`` built on the meta device (no weights), with its
    tokenizer and layout."""
    folder = Path(options.model).expanduser()
    remote = options.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except Exception as exc:  # transformers' own errors, by the kind of failure
        raise RefdirError(load_failure(f"model {options.model!r}", exc)) from None
    return ChatModel(
        model,
        tokenizer,
        name=options.model,
        system=options.system,
        chat_template=options.chat_template,
        template_kwargs=options.template_options(),
        layout_spec=options.layout_spec(),
    )


def _names(model: nn.Module) -> dict[int, str]:
    """Each parameter and buffer (by id) -> the name it is saved under (a tied weight: the
    first of its names, the one ``save_pretrained`` keeps)."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), name)
    return names


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _check_names(cm: ChatModel, ckpt: Checkpoint) -> None:
    """Every parameter the model saves is a tensor of the checkpoint under its own name."""
    stored = set(ckpt.where)
    persistent = set(cm.model.state_dict())  # what save_pretrained writes, tied names and all
    saved = [name for name in _names(cm.model).values() if name in persistent]
    missing = sorted(name for name in saved if name not in stored)
    if missing:
        raise RefdirError(
            f"{ckpt.folder} stores its tensors under other names than {type(cm.model).__name__} "
            f"has (no {missing[0]}; transformers converts them while loading), which streamed "
            "editing cannot follow; edit it in memory (`stream=False`)"
        )


def _materialize(module: nn.Module, cm: ChatModel, ckpt: Checkpoint) -> None:
    """Give a meta module of ``cm`` (a sandwich norm) its weights from the checkpoint."""
    names = _names(cm.model)
    for pname, param in list(module.named_parameters()):
        owner_name, _, key = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = ckpt.read(names[id(param)])
        setattr(owner, key, nn.Parameter(value, requires_grad=False))


def _norms(cm: ChatModel, ckpt: Checkpoint) -> None:
    for layer in cm.layout.per_layer:
        for write in layer.writes:
            if write.norm is not None:
                _materialize(write.norm, cm, ckpt)


def _fits(direction: Direction, cm: ChatModel, ckpt: Checkpoint) -> None:
    """:meth:`Direction.fits`, with the read-out the model signature is made of read from the
    checkpoint."""
    direction.check(cm.d_model, cm.n_layers)
    if direction.model_signature is None:
        return
    layout = cm.layout
    source = layout.unembed if layout.unembed is not None else layout.embed
    weight = getattr(source, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        weight = layout.embed.weight
    holder = nn.Module()
    holder.weight = nn.Parameter(ckpt.read(_names(cm.model)[id(weight)]), requires_grad=False)
    direction.fits(replace(layout, unembed=holder))


@dataclass(frozen=True)
class _Plan:
    """What the streamed edit does: an edit per tensor name, and the untied read-out's name
    (None: the read-out stays as it is)."""

    edits: dict[str, TensorEdit]
    untie_as: str | None
    embed_name: str


def _untied_name(cm: ChatModel) -> str | None:
    """The name the untied read-out is saved under, if the model ties it to the embedding."""
    if cm.layout.unembed is None or not cm.layout.tied:
        return None
    return f"{_module_name(cm.model, cm.layout.unembed)}.weight"


def _orthogonalize_plan(cm: ChatModel, direction: Direction) -> tuple[_Plan, OrthogonalizeReport]:
    """The tensors :func:`~refdir.interventions.orthogonalization.orthogonalize` edits, each
    with its edit, and its report."""
    names = _names(cm.model)
    r = unit_vector(direction.vector)
    edits: dict[str, TensorEdit] = {}
    for embedding in cm.layout.embeddings:
        edits[names[id(embedding.weight)]] = partial(edit_rows, r=r)
    for layer in cm.layout.per_layer:
        for write in layer.writes:
            u = write_direction(cm, write.norm, r)
            for weight in write.weights:
                edits[names[id(weight.param)]] = partial(edit_output, u=u, axis=weight.axis)
                if weight.bias is not None:
                    edits[names[id(getattr(weight.module, weight.bias))]] = partial(edit_bias, u=u)
    untie = _untied_name(cm)
    exact, note = orthogonalized_exactness(cm.layout)
    plan = _Plan(edits, untie, names[id(cm.layout.embed.weight)])
    return plan, OrthogonalizeReport(exact, untie is not None, len(edits), note)


def _edit_plan(cm: ChatModel, edit: Edit) -> tuple[_Plan, OrthogonalizeReport]:
    """The tensors :func:`~refdir.interventions.edit_weights.edit_weights` edits, each with its
    edit, and its report."""
    names = _names(cm.model)
    edits: dict[str, TensorEdit] = {}
    if edit.embed > 0:
        for embedding in cm.layout.embeddings:
            edits[names[id(embedding.weight)]] = partial(
                edit_embedding, basis=edit.basis, w=edit.embed, keep=edit.norm_preserving
            )
    for index, write, w in edit.sites(cm.layout):
        basis = write_basis(cm.layout, write, edit.basis_at(index))
        for weight in write.weights:
            edits[names[id(weight.param)]] = partial(
                edit_output_weight, axis=weight.axis, basis=basis, w=w, keep=edit.norm_preserving
            )
            if weight.bias is not None:
                bias = getattr(weight.module, weight.bias)
                edits[names[id(bias)]] = partial(edit_output_bias, basis=basis, w=w)
    untie = _untied_name(cm) if edit.embed > 0 else None
    exact, note = edit_exactness(cm.layout)
    plan = _Plan(edits, untie, names[id(cm.layout.embed.weight)])
    return plan, OrthogonalizeReport(exact, untie is not None, len(edits), note)


_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
"""The safetensors dtypes refdir streams, as torch's."""


@dataclass(frozen=True)
class _Shard:
    """A safetensors file's header: each tensor's dtype name, shape and byte range (from the
    start of the data), and its metadata."""

    path: Path
    data_start: int
    tensors: dict[str, tuple[str, list[int], int, int]]
    metadata: dict[str, str] | None

    @classmethod
    def read(cls, path: Path) -> _Shard:
        try:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            metadata = header.pop("__metadata__", None)
            tensors = {
                str(name): (
                    str(e["dtype"]),
                    [int(n) for n in e["shape"]],
                    int(e["data_offsets"][0]),
                    int(e["data_offsets"][1]),
                )
                for name, e in header.items()
            }
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise RefdirError(f"{path} is not a readable safetensors file ({exc})") from None
        return cls(path, 8 + size, tensors, metadata)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain reads (not mapped: only the tensor is resident)."""
        dtype, shape, begin, end = self.tensors[name]
        if dtype not in _DTYPES:
            raise RefdirError(f"{self.path} holds {name} as {dtype}, which refdir cannot stream")
        data = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(data.numpy().data) != end - begin:
                raise RefdirError(f"{self.path} ends inside {name}; copy the checkpoint again")
        return data.view(_DTYPES[dtype]).reshape(shape)


def _write_shard(source: Path, names: Sequence[str], plan: _Plan, target: Path) -> dict[str, int]:
    """The shard ``source``, its tensors edited by ``plan`` (and the untied read-out before
    the embedding), written to ``target`` one tensor at a time: the safetensors header first,
    from ``source``'s, then each tensor as it is read and edited, so that one tensor is in
    memory at a time. Returns each written tensor's size in bytes."""
    shard = _Shard.read(source)
    order = [(name, name) for name in names]
    if plan.untie_as is not None and plan.embed_name in names:
        order.insert(names.index(plan.embed_name), (plan.untie_as, plan.embed_name))
    header: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    offset = 0
    for name, origin in order:
        dtype, shape, begin, end = shard.tensors[origin]
        sizes[name] = end - begin
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    if shard.metadata:
        header["__metadata__"] = shard.metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with target.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, origin in order:
            tensor = shard.get(origin)
            edit = plan.edits.get(origin) if name == origin else None
            if edit is not None:
                with torch.no_grad():
                    edit(tensor)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return sizes


def _write_shards(ckpt: Checkpoint, plan: _Plan, tmp: Path) -> None:
    """Each shard of ``ckpt``, its tensors edited by ``plan``, under its own name in ``tmp``,
    with the index (the untied read-out beside the embedding)."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard, names in ckpt.shards.items():
        sizes = _write_shard(ckpt.folder / shard, names, plan, tmp / shard)
        weight_map |= dict.fromkeys(sizes, shard)
        total += sum(sizes.values())
    if list(ckpt.shards) == [SINGLE_FILE]:
        return  # one file, as it came
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_beside(cm: ChatModel, ckpt: Checkpoint, plan: _Plan, tmp: Path) -> None:
    """The config (untied where the read-out was untied), the tokenizer and the files kept."""
    config = cm.model.config
    if plan.untie_as is not None:
        for each in {id(c): c for c in (config, config.get_text_config())}.values():
            each.tie_word_embeddings = False
    config.save_pretrained(tmp)
    cm.tokenizer.save_pretrained(tmp)
    for name in _FILES_KEPT:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, tmp / name)


class _OnDisk(ChatModel):
    """A model run from its checkpoint on disk (accelerate's disk offload): its weights stay
    on the meta device between the forward passes of their modules, its inputs go to the CPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def _on_disk(folder: Path, like: ChatModel, offload: Path, remote: bool) -> ChatModel:
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype="auto",
            device_map={"": "disk"},
            offload_folder=str(offload),
            trust_remote_code=remote,
        )
    except Exception as exc:  # transformers' and accelerate's own errors
        raise RefdirError(load_failure(f"checkpoint {folder}", exc)) from None
    return _OnDisk(
        model,
        like.tokenizer,
        name=like.name,
        system=like.system,
        chat_template=like.chat_template,
        template_kwargs=like.template_kwargs,
        layout_spec=like.layout_spec,
    )


def _check_streamable(options: ModelOptions) -> None:
    if options.dtype != "auto":
        raise RefdirError(
            "streamed editing writes each tensor in its stored dtype, not "
            f"`dtype='{options.dtype}'`; leave `dtype='auto'`, or edit in memory (`stream=False`)"
        )
    if options.device != "cpu":
        raise RefdirError(
            f"streamed editing runs on the CPU, not `device='{options.device}'`; use "
            "`device='cpu'`, or edit in memory (`stream=False`)"
        )
    if options.gguf_file is not None or Path(options.model).suffix == ".gguf":
        raise RefdirError(
            "streamed editing reads safetensors checkpoints, not GGUF; edit it in memory "
            "(`stream=False`)"
        )
    if not Path(options.model).expanduser().is_dir():
        raise RefdirError(
            f"streamed editing needs a local model folder, not {options.model!r}; download it "
            "(hf download) and give its folder, or edit it in memory (`stream=False`)"
        )


def _prepared(options: ModelOptions, out: Path) -> tuple[ChatModel, Checkpoint]:
    """The model on the meta device and its checkpoint, once both are known to stream, and
    room for the export under ``out``."""
    _check_streamable(options)
    ckpt = read_checkpoint(Path(options.model).expanduser())
    cm = _meta_model(options)
    _check_names(cm, ckpt)
    check_editable(cm)
    largest = max((ckpt.folder / shard).stat().st_size for shard in ckpt.shards)
    embed = cm.layout.embed.weight
    extra = embed.numel() * embed.element_size()  # an untied read-out, at most
    check_room(out, int(ckpt.nbytes * 1.05) + extra + 64 * 10**6, (out / "x", largest + extra))
    _norms(cm, ckpt)
    return cm, ckpt


def stream_orthogonalized(
    options: ModelOptions,
    direction: Direction,
    out: str | Path,
    prompts: Sequence[str] = _PROBES,
) -> ExportManifest:
    """Orthogonalize the safetensors checkpoint in the local folder ``options.model`` against
    ``direction`` shard by shard, and write it with its tokenizer, the direction and the
    manifest of :func:`~refdir.interventions.export.export_orthogonalized` to ``out``
    atomically. The tensors equal those of the in-memory export of the model loaded in its
    stored dtype."""
    out = check_export_folder(Path(out))
    cm, ckpt = _prepared(options, out)
    _fits(direction, cm, ckpt)
    plan, report = _orthogonalize_plan(cm, direction)
    with atomic_folder(out) as tmp:
        _write_shards(ckpt, plan, tmp)
        _write_beside(cm, ckpt, plan, tmp)
        offload = tmp / ".offload"
        source = _on_disk(ckpt.folder, cm, offload, options.trust_remote_code)
        batch = source.chat.encode(list(prompts))
        base = residuals(source, batch)
        with ablate(source, direction.for_any_model()):
            hooked = last_logits(source, prompts)
        del source
        edited_model = _on_disk(tmp, cm, offload, options.trust_remote_code)
        edited = last_logits(edited_model, prompts)
        left = leftover(residuals(edited_model, batch), unit_vector(direction.vector), base)
        dtype = edited_model.layout.embed.weight.dtype
        del edited_model
        delta, scale = logit_delta(batch.attention_mask, hooked, edited)
        report = judged(report, left, delta, scale, dtype, type(cm.model).__name__)
        if max(left) > rounding_limit(dtype):
            raise RefdirError(f"cannot export an orthogonalized {cm.name}: {report.note}")
        shutil.rmtree(offload, ignore_errors=True)
        manifest = export_manifest(cm.name, None, report, delta, dtype, direction)
        direction.save(tmp)
        manifest.write(tmp)
        _card(tmp, manifest, direction, ckpt)
    return manifest


def _card(tmp: Path, manifest: ExportManifest, direction: Direction, ckpt: Checkpoint) -> None:
    """The export's model card, as the in-memory export writes it."""
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    card = model_card(
        manifest,
        direction,
        files,
        base_model=base_model_id(str(ckpt.folder)),
        license_id=card_license(ckpt.folder),
    )
    write_text(tmp / CARD_FILE, card)


def stream_edit(
    options: ModelOptions,
    edit: Edit,
    direction: Direction,
    out: str | Path,
    prompts: Sequence[str] = _PROBES,
) -> ExportManifest:
    """Fold ``edit`` into the safetensors checkpoint in the local folder ``options.model``
    shard by shard, and write it as :func:`~refdir.interventions.export.export_edit` does.
    A norm-preserving edit is refused: its hooks, which parity runs, need every output
    weight in memory."""
    if edit.norm_preserving:
        raise RefdirError(
            "a norm-preserving edit cannot be streamed (its hooks read every output weight); "
            "export it in memory"
        )
    out = check_export_folder(Path(out))
    cm, ckpt = _prepared(options, out)
    edit.check(cm.layout)
    plan, report = _edit_plan(cm, edit)
    with atomic_folder(out) as tmp:
        _write_shards(ckpt, plan, tmp)
        _write_beside(cm, ckpt, plan, tmp)
        offload = tmp / ".offload"
        source = _on_disk(ckpt.folder, cm, offload, options.trust_remote_code)
        with edit.apply(source):
            hooked = last_logits(source, prompts)
        del source
        edited_model = _on_disk(tmp, cm, offload, options.trust_remote_code)
        edited = last_logits(edited_model, prompts)
        dtype = edited_model.layout.embed.weight.dtype
        del edited_model
        mask = cm.chat.encode(list(prompts)).attention_mask
        delta, scale = logit_delta(mask, hooked, edited)
        if not torch.isfinite(torch.tensor(delta)):
            raise RefdirError("the edited model's logits are not finite; the edit is too strong")
        report = measured_exactness(report, dtype, delta, scale, "the edit's hooks")
        shutil.rmtree(offload, ignore_errors=True)
        manifest = export_manifest(cm.name, None, report, delta, dtype, direction, edit)
        edit.save(tmp)
        direction.save(tmp)
        manifest.write(tmp)
        _card(tmp, manifest, direction, ckpt)
    return manifest
