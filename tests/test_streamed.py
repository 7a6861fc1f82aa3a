"""Streamed editing of a sharded checkpoint (refdir.interventions.streamed): the tensors equal
those of the in-memory export byte for byte, the manifest is the same, and a killed export
leaves nothing that looks finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from refdir.artifacts.export import ExportManifest
from refdir.cli.commands import app
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.export import export_edit, export_orthogonalized
from refdir.interventions.orthogonalization import edit_output, unit_vector
from refdir.interventions.projection import orthonormal
from refdir.interventions.streamed import (
    INDEX_FILE,
    stream_edit,
    stream_orthogonalized,
    streams_by_default,
)
from refdir.model.chat_model import ChatModel
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from tiny import tiny_chat_model

SHARD = "20KB"
"""Small enough that a tiny model spreads over about ten shards."""


def _sharded(tmp_path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
    cm = tiny_chat_model(arch)
    folder = tmp_path / f"{arch}-sharded"
    cm.model.to(dtype).save_pretrained(folder, max_shard_size=SHARD)
    cm.tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def _direction(cm: ChatModel) -> Direction:
    torch.manual_seed(1)
    return Direction(torch.randn(cm.d_model), 1, -1, "tiny")


def _tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor of a checkpoint folder: dtype, shape and raw bytes, by name."""
    found: dict[str, tuple[str, list[int], bytes]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.startswith(("direction", "edit")):
            continue
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            for name in names:
                t = f.get_tensor(name).contiguous()
                found[name] = (str(t.dtype), list(t.shape), t.view(torch.uint8).numpy().tobytes())
    return found


def _same_manifest(streamed: ExportManifest, in_memory: ExportManifest) -> None:
    """Equal, but for the rounding the parity passes measure, which runs from disk (one module
    at a time) in the streamed export and may round apart by a few parts in 1e5."""
    rounding = {"residual_left", "parity_max_abs_logit_delta"}
    assert streamed.model_dump(exclude=rounding) == in_memory.model_dump(exclude=rounding)
    for key in rounding:
        got, want = getattr(streamed, key), getattr(in_memory, key)
        assert (got is None) == (want is None)
        if got is not None:
            assert got == pytest.approx(want, rel=1e-3, abs=1e-9)


def _in_memory(folder: Path, dtype: torch.dtype) -> ChatModel:
    return load_model(str(folder), dtype=dtype)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("llama", torch.float32),
        ("llama", torch.bfloat16),
        ("gemma", torch.float32),  # tied embeddings: the read-out is untied
        ("gemma2", torch.float32),  # sandwich norms: approximate, through the norms' scale
        ("gpt2", torch.float32),  # Conv1D writes, learned positions, biases
    ],
)
def test_streamed_export_equals_the_in_memory_one_byte_for_byte(
    tmp_path: Path, arch: str, dtype: torch.dtype
) -> None:
    source = _sharded(tmp_path, arch, dtype)
    assert streams_by_default(str(source))
    cm = _in_memory(source, dtype)
    direction = _direction(cm)
    streamed = stream_orthogonalized(ModelOptions(model=str(source)), direction, tmp_path / "s")
    in_memory = export_orthogonalized(cm, direction, tmp_path / "m")
    _same_manifest(streamed, in_memory)
    assert streamed.edited_tensors > 3
    got, want = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert got.keys() == want.keys()
    assert [n for n in got if got[n] != want[n]] == []
    original = _tensors(source)
    assert sum(got[n] != original[n] for n in original) == streamed.edited_tensors
    assert streamed.untied_embeddings == (arch in ("gemma", "gemma2", "gpt2"))
    assert ("lm_head.weight" in original) != streamed.untied_embeddings
    assert "lm_head.weight" in got
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(got)
    # the export loads as an ordinary checkpoint, with the same config as the in-memory one
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (
        config["tie_word_embeddings"]
        == json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"]
    )
    load_model(str(tmp_path / "s"), dtype=dtype)


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_streamed_edit_equals_the_in_memory_one(tmp_path: Path, per_layer: bool) -> None:
    source = _sharded(tmp_path, "gemma")
    cm = _in_memory(source, torch.float32)
    g = torch.Generator().manual_seed(2)
    n = cm.n_layers
    layers = torch.stack([orthonormal(torch.randn(2, cm.d_model, generator=g)) for _ in range(n)])
    edit = Edit(
        orthonormal(torch.randn(2, cm.d_model, generator=g)),
        tuple(float(x) for x in torch.rand(n, generator=g) * 1.5),
        tuple(float(x) for x in torch.rand(n, generator=g)),
        embed=0.7,
        params={"trial": 3},
        layer_basis=layers if per_layer else None,
    )
    direction = _direction(cm)
    streamed = stream_edit(ModelOptions(model=str(source)), edit, direction, tmp_path / "s")
    in_memory = export_edit(cm, edit, direction, tmp_path / "m")
    _same_manifest(streamed, in_memory)
    assert streamed.edit is not None
    assert _tensors(tmp_path / "s") == _tensors(tmp_path / "m")
    assert Edit.load(tmp_path / "s").attn == edit.attn


def test_what_cannot_stream_is_refused_in_one_line(tmp_path: Path) -> None:
    source = _sharded(tmp_path, "qwen3_moe")  # per-expert tensors, fused while loading
    direction = _direction(tiny_chat_model("qwen3_moe"))
    with pytest.raises(RefdirError, match=r"other names.*`stream=False`"):
        stream_orthogonalized(ModelOptions(model=str(source)), direction, tmp_path / "a")
    llama = _sharded(tmp_path, "llama")
    with pytest.raises(RefdirError, match=r"stored dtype, not `dtype='bf16'`.*`stream=False`"):
        stream_orthogonalized(
            ModelOptions(model=str(llama), dtype="bf16"), direction, tmp_path / "d"
        )
    cm = tiny_chat_model("llama")
    edit = Edit(
        orthonormal(torch.randn(1, cm.d_model)), (1.0,) * 3, (1.0,) * 3, norm_preserving=True
    )
    with pytest.raises(RefdirError, match="norm-preserving"):
        stream_edit(ModelOptions(model=str(llama)), edit, _direction(cm), tmp_path / "b")
    other = Direction(torch.randn(cm.d_model), 1, -1, "other", model_signature=(1.0,) * 32)
    with pytest.raises(RefdirError, match="another model of this width"):
        stream_orthogonalized(ModelOptions(model=str(llama)), other, tmp_path / "c")
    assert not any(p.name in ("a", "b", "c", "d") for p in tmp_path.iterdir())


def test_orthogonalize_streams_a_sharded_folder_unless_told(tmp_path: Path) -> None:
    source = _sharded(tmp_path)
    cm = _in_memory(source, torch.float32)
    _direction(cm).save(tmp_path / "direction")
    runner = CliRunner()
    base = ["orthogonalize", "--model", str(source), "--direction", str(tmp_path / "direction")]
    streamed = runner.invoke(app, [*base, "--out", str(tmp_path / "s")])
    assert streamed.exit_code == 0, streamed.output
    assert "exact" in streamed.output and (tmp_path / "s" / INDEX_FILE).is_file()
    loaded = runner.invoke(app, [*base, "--out", str(tmp_path / "m"), "--no-stream"])
    assert loaded.exit_code == 0, loaded.output
    assert (tmp_path / "m" / "model.safetensors").is_file()  # save_pretrained's one file
    assert _tensors(tmp_path / "s") == _tensors(tmp_path / "m")
    single = tmp_path / "single"  # one model.safetensors: streamed when asked
    cm.model.save_pretrained(single)
    cm.tokenizer.save_pretrained(single)
    assert not streams_by_default(str(single))
    one = ["orthogonalize", "--model", str(single), "--direction", str(tmp_path / "direction")]
    asked = runner.invoke(app, [*one, "--out", str(tmp_path / "one"), "--stream"])
    assert asked.exit_code == 0, asked.output
    assert not (tmp_path / "one" / INDEX_FILE).exists()
    assert _tensors(tmp_path / "one") == _tensors(tmp_path / "m")
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--device", "cuda"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "not --device cuda; use --device cpu, or edit in memory (--no-stream)" in refused.output


KILLED_MIDWAY = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from refdir.directions.direction import Direction
    from refdir.interventions import streamed
    from refdir.model.options import ModelOptions

    written = []
    write = streamed._write_shard

    def write_then_die(*args):
        sizes = write(*args)
        written.append(sizes)
        if len(written) == 3:  # three shards written, the rest to come
            os.kill(os.getpid(), signal.SIGKILL)
        return sizes

    streamed._write_shard = write_then_die
    direction = Direction(torch.ones(32), 1, -1, "tiny")
    streamed.stream_orthogonalized(ModelOptions(model=sys.argv[1]), direction, sys.argv[2])
    """
)


def test_a_killed_streamed_export_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    source = _sharded(tmp_path)
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, sys.path)), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MIDWAY, str(source), str(out)], env=env, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert len(left) == 1 and list(left[0].glob("*.safetensors"))  # the shards so far, hidden
    stream_orthogonalized(
        ModelOptions(model=str(source)), Direction(torch.ones(32), 1, -1, "t"), out
    )
    assert (out / "refdir_manifest.json").is_file()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


@pytest.mark.parametrize("axis", [-1, -2])
def test_an_edit_rounds_alike_wherever_the_weight_lies_in_memory(axis: int) -> None:
    """A weight mapped from a file may start anywhere; the edit's rounding must not follow."""
    torch.manual_seed(0)
    weight = torch.randn(300, 64) if axis == -1 else torch.randn(64, 300)
    u = unit_vector(torch.randn(64))
    aligned = weight.clone()
    unaligned = torch.empty(weight.numel() + 1)[1:].view(weight.shape)  # 4 bytes off
    unaligned.copy_(weight)
    edit_output(aligned, u, axis)
    edit_output(unaligned, u, axis)
    assert torch.equal(aligned, unaligned) and not torch.equal(aligned, weight)
