"""An edited model written back as GGUF: the source GGUF's metadata (architecture, tokenizer,
chat template, license) kept key by key, every tensor taken from the edited model.

The model must have come from a GGUF (the bundled organism's base is one): its file gives the
metadata and the tensor names. Names are matched by transformers' own GGUF mapping
(``get_gguf_hf_weights_map``), and each tensor is turned back into the GGUF's layout by
undoing transformers' loading step for it (Llama's rotary permutation of ``attn_q``/``attn_k``);
every tensor written is checked to load back as the model's own, so an architecture whose
loading step is not undone here is refused rather than written wrong. A model that came from
safetensors has no GGUF metadata to keep: llama.cpp's ``convert_hf_to_gguf.py`` converts its
safetensors export.

Tensor types: F32, F16, BF16, the block quantizations the ``gguf`` package writes (Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1), or ``source``: each tensor in the type it had in the input, where the
package can write that type (F16 where it cannot). One-dimensional tensors (norms, biases)
stay F32, as llama.cpp's converter keeps them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from refdir.errors import RefdirError
from refdir.model.chat_model import ChatModel

__all__ = [
    "GGUF_TYPES",
    "GgufFile",
    "check_gguf_type",
    "gguf_license",
    "gguf_model_file",
    "read_gguf",
    "write_gguf",
]

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "source")
_WRITABLE = {GGMLQuantizationType[name] for name in GGUF_TYPES if name != "source"}
_FILE_TYPE = {  # general.file_type (llama_ftype) of a file whose matrices are all of one type
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "BF16": 32,
}
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


@dataclass(frozen=True)
class GgufFile:
    """What :func:`write_gguf` wrote."""

    path: Path
    tensors: int
    types: dict[str, int]
    """tensor type name -> how many tensors of it."""


def check_gguf_type(name: str) -> str:
    """``name`` as one of :data:`GGUF_TYPES` (any case), or a one-line error."""
    for known in GGUF_TYPES:
        if name.lower() == known.lower():
            return known
    raise RefdirError(f"unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}")


def read_gguf(path: Path) -> GGUFReader:
    """``path`` opened with the gguf package's reader, or a one-line error."""
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises whatever numpy and struct raise
        raise RefdirError(f"{path} is not a GGUF file the gguf package reads ({exc})") from None


def gguf_license(path: Path) -> str | None:
    """The source GGUF's ``general.license``, where it has one."""
    field = read_gguf(path).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Llama's rotary layout in GGUF: per head, the two rotary halves interleaved (the inverse
    of transformers' ``_reverse_permute_weights``)."""
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def _processor(cm: ChatModel, arch: str) -> TensorProcessor:
    config = cm.model.config.get_text_config().to_dict()
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)


def _gguf_layout(
    name: str, hf: np.ndarray, processor: TensorProcessor, heads: tuple[int, int]
) -> np.ndarray:
    """``hf`` (the model's tensor) in the GGUF's layout: the candidate that transformers'
    loading step turns back into ``hf`` exactly."""
    candidates = [hf]
    if ".attn_q." in name:
        candidates.append(_llama_permute(hf, heads[0]))
    elif ".attn_k." in name:
        candidates.append(_llama_permute(hf, heads[1]))
    for candidate in candidates:
        loaded = processor.process(weights=candidate.copy(), name=name)
        if loaded.name == name and np.array_equal(loaded.weights, hf):
            return candidate
    raise RefdirError(
        f"cannot write {name} back as GGUF: transformers loads it through a step refdir does "
        "not undo; export with `--format safetensors` and convert with llama.cpp"
    )


def _out_type(kind: str, source: GGMLQuantizationType | None, array: np.ndarray) -> Any:
    if array.ndim < 2:
        return GGMLQuantizationType.F32
    wanted = (
        (source if source in _WRITABLE else GGMLQuantizationType.F16)
        if kind == "source" and source is not None
        else GGMLQuantizationType.F16
        if kind == "source"
        else GGMLQuantizationType[kind]
    )
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if array.shape[-1] % block == 0 else GGMLQuantizationType.F16


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: int | None) -> None:
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    if file_type is not None:
        writer.add_file_type(file_type)
    elif "general.file_type" in reader.fields:
        writer.add_file_type(int(reader.fields["general.file_type"].contents()))


def write_gguf(cm: ChatModel, source: Path, target: Path, kind: str = "F16") -> GgufFile:
    """Write ``cm`` (edited or not) to ``target`` as GGUF with ``source``'s metadata and tensor
    names, its tensors in ``kind`` (see the module's doc)."""
    kind = check_gguf_type(kind)
    reader = read_gguf(source)
    arch = str(reader.fields["general.architecture"].contents())
    processor = _processor(cm, arch)
    try:
        names = get_gguf_hf_weights_map(cm.model, processor)
    except NotImplementedError as exc:
        raise RefdirError(f"transformers cannot map {arch}'s tensors to GGUF ({exc})") from None
    state = cm.model.state_dict()
    text = cm.model.config.get_text_config()
    heads = (int(text.num_attention_heads), int(getattr(text, "num_key_value_heads", 0) or 0))
    heads = (heads[0], heads[1] or heads[0])
    plan: list[tuple[str, Any, Any]] = []  # (gguf name, hf name or source tensor, source type)
    seen: set[str] = set()
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is not None and hf_name in state:
            plan.append((tensor.name, hf_name, tensor.tensor_type))
            seen.add(hf_name)
        else:
            plan.append((tensor.name, tensor, tensor.tensor_type))
    unembed = cm.layout.unembed
    if unembed is not None and not cm.layout.tied:  # an unembedding of its own (untied)
        hf_name = next(n for n, p in cm.model.named_parameters() if p is unembed.weight)
        if hf_name not in seen:
            embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            plan.append(("output.weight", hf_name, embed.tensor_type if embed else None))
            seen.add(hf_name)
    edited = {n for n, p in cm.model.named_parameters() if p.dim() >= 1}
    missing = sorted(n for n in edited - seen if _written_in_gguf(n))
    if missing:
        raise RefdirError(
            f"the GGUF {source.name} has no tensor for {missing[0]} (and {len(missing) - 1} "
            "more); it is not the file this model was loaded from"
        )
    writer = GGUFWriter(str(target), arch=arch)
    types: dict[str, int] = {}
    try:
        for name, what, source_type in plan:
            if isinstance(what, str):
                hf = state[what].detach().float().cpu().numpy()
                array = _gguf_layout(name, hf, processor, heads)
                qtype = _out_type(kind, source_type, array)
                data = _encode(array, qtype)
                writer.add_tensor(name, data, raw_dtype=qtype)
            else:  # a tensor the model does not hold: as it is, or in the type asked for
                qtype = what.tensor_type
                data = np.asarray(what.data)
                plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
                if qtype in plain and kind != "source":
                    qtype = _out_type(kind, qtype, data)
                    data = _encode(data.astype(np.float32), qtype)
                writer.add_tensor(name, data, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        _copy_metadata(reader, writer, _FILE_TYPE.get(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return GgufFile(target, len(plan), types)


def _written_in_gguf(hf_name: str) -> bool:
    """Whether a parameter belongs in a GGUF (rotary tables and the like do not)."""
    return not hf_name.endswith(("inv_freq", "rotary_emb.weight"))


def gguf_model_file(kind: str) -> str:
    """The file name of an exported GGUF of tensor type ``kind``."""
    return f"model-{check_gguf_type(kind).lower()}.gguf"
