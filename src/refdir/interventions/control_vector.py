"""A direction as a llama.cpp control vector (``llama-cli --control-vector FILE``).

llama.cpp reads a GGUF whose tensors are named ``direction.N``, one-dimensional F32 of the
model's width, N from 1: it adds ``direction.N`` (times the file's scale) to the output of
block N, at every position. Block N's output is the residual input of block N + 1, so a
refdir direction at layer L (the input of decoder layer L) goes in ``direction.{L-1}``; layer 0
(the embedding's output) cannot be reached. Metadata: ``general.architecture =
controlvector``, ``controlvector.model_hint`` (the model's llama.cpp architecture) and
``controlvector.layer_count``.

The file holds one tensor per block 1 .. n_layers - 1, zero except at the direction's block:
activation addition of ``coeff`` times the direction at its layer, as ``refdir add`` does. A
negative coefficient subtracts it (the direction's "bypass" use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.io import atomic_path

__all__ = ["ARCHITECTURE", "control_vector_tensors", "write_control_vector"]

ARCHITECTURE = "controlvector"


def control_vector_tensors(
    direction: Direction, n_layers: int, coeff: float = 1.0
) -> dict[str, np.ndarray]:
    """The tensors of the control vector of ``coeff`` x ``direction`` on a model of
    ``n_layers`` decoder layers (see the module's doc)."""
    if direction.layer > n_layers:
        raise RefdirError(
            f"the direction is at layer {direction.layer} but the model has {n_layers} layers; "
            "use a direction of this model"
        )
    if direction.layer < 2:
        raise RefdirError(
            f"the direction is at layer {direction.layer}, but llama.cpp steers only the outputs "
            "of blocks 1 and later, the inputs of layers 2 and later; pick a direction at layer "
            "2 or later"
        )
    if not np.isfinite(coeff):
        raise RefdirError(f"`coeff` must be a finite number, got {coeff}")
    vector = (direction.vector.double() * coeff).float().cpu().numpy()
    width = vector.shape[0]
    return {
        f"direction.{block}": (
            vector if block == direction.layer - 1 else np.zeros(width, dtype=np.float32)
        )
        for block in range(1, n_layers)
    }


def write_control_vector(
    direction: Direction, n_layers: int, out: str | Path, model_hint: str, coeff: float = 1.0
) -> Path:
    """Write the control vector of ``coeff`` x ``direction`` to ``out`` (a ``.gguf`` file),
    through a temporary file renamed at the end."""
    target = Path(out)
    if target.suffix != ".gguf":
        raise RefdirError(f"{target} does not end in .gguf; name the control vector FILE.gguf")
    if target.exists():
        raise RefdirError(f"{target} exists; choose a new `out` file")
    tensors = control_vector_tensors(direction, n_layers, coeff)
    with atomic_path(target) as tmp:
        writer = GGUFWriter(str(tmp), arch=ARCHITECTURE)
        try:
            writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
            writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(tensors))
            for name, array in tensors.items():
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return target
