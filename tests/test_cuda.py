"""refdir on a CUDA GPU gives what it gives on the CPU. Skipped where no GPU is visible (CI has
none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.directions.scoring import score_candidates
from refdir.interventions.intervention import ablate, add
from refdir.interventions.orthogonalization import parity
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, last_position_logits
from refdir.study.run import run_pipeline
from tiny import TINY_RUN, tiny_chat_model, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENS = list(TINY_RUN.refusal_tokens or ())
PROMPTS = ["Name a colour.", "How do I bake bread?", "Write a haiku about rain.", "Hi"]


def _pair(arch: str = "llama") -> tuple[ChatModel, ChatModel]:
    """The same tiny model twice, on the CPU and on the GPU (float32 both)."""
    cpu, gpu = tiny_chat_model(arch), tiny_chat_model(arch)
    cpu.model.to("cpu")  # also under REFDIR_TEST_DEVICE=cuda
    gpu.model.to("cuda")
    assert gpu.device.type == "cuda"
    return cpu, gpu


def _direction(cm: ChatModel) -> Direction:
    torch.manual_seed(3)
    return Direction(torch.randn(cm.d_model), 1, -1, cm.name)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_extraction_and_scores_on_cuda_equal_the_cpu(arch: str) -> None:
    cpu, gpu = _pair(arch)
    harmful, harmless = sample_prompts("harmful_val", 6, 0), sample_prompts("harmless_val", 6, 0)
    on_cpu = extract_candidates(cpu, harmful, harmless, 4, progress=False)
    on_gpu = extract_candidates(gpu, harmful, harmless, 4, progress=False)
    assert on_gpu.diffs.dtype == torch.float64 and on_gpu.diffs.device.type == "cpu"
    torch.testing.assert_close(on_gpu.diffs, on_cpu.diffs, atol=1e-5, rtol=1e-4)
    scores = [
        score_candidates(
            cm, c, harmful, harmless, TOKENS, batch_size=4, progress=False, prune=False
        )
        for cm, c in ((cpu, on_cpu), (gpu, on_gpu))
    ]
    for name, atol in (("bypass", 1e-4), ("induce", 1e-4), ("kl", 1e-5)):  # KL ~ 3e-4 here
        a, b = getattr(scores[0], name), getattr(scores[1], name)
        assert torch.equal(a.isnan(), b.isnan()) and a.isfinite().any()
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-3, equal_nan=True)


def test_interventions_and_greedy_generation_on_cuda_equal_the_cpu() -> None:
    cpu, gpu = _pair()
    direction = _direction(cpu)
    base = last_position_logits(gpu, PROMPTS)
    results = {}
    for name, cm in (("cpu", cpu), ("gpu", gpu)):
        with ablate(cm, direction):
            ablated = last_position_logits(cm, PROMPTS)
            ablated_text = generate(cm, PROMPTS, 12, 4, progress=False)
        with add(cm, direction, 4.0):
            added = last_position_logits(cm, PROMPTS)
        results[name] = (ablated.cpu(), added.cpu(), ablated_text)
    for got, want in zip(results["gpu"][:2], results["cpu"][:2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert results["gpu"][2] == results["cpu"][2]
    for changed in results["gpu"][:2]:  # both hooks acted on the GPU
        assert float((changed - base.cpu()).abs().max()) > 1e-3


def test_weight_edit_on_cuda_equals_hook_ablation() -> None:
    _, gpu = _pair()
    report, delta = parity(gpu, _direction(gpu))
    assert gpu.layout.embed.weight.device.type == "cuda"
    assert report.exact and delta < 1e-4


def test_weight_edit_in_bfloat16_on_cuda_writes_nothing_along_the_direction() -> None:
    _, gpu = _pair()
    gpu.model.to(torch.bfloat16)
    report, delta = parity(gpu, _direction(gpu))
    assert report.exact, report.note  # nothing left along the direction beyond rounding
    assert delta < 0.1  # bfloat16 rounding of the edited weights, recorded


def test_refdir_run_on_cuda_in_bfloat16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import refdir.study.state

    loaded: list[ChatModel] = []  # the model the run loads, to see where and in what it ran
    real = refdir.study.state.load_model
    monkeypatch.setattr(
        refdir.study.state, "load_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1]
    )
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    # dtype auto: bfloat16 on a GPU
    config = TINY_RUN.model_copy(update={"model": str(folder), "device": "cuda"})
    torch.cuda.reset_peak_memory_stats()
    done = run_pipeline(config, tmp_path / "run", progress=False)
    assert torch.cuda.max_memory_allocated() > 0  # the model ran on the GPU
    (cm,) = loaded
    assert cm.device.type == "cuda" and cm.layout.embed.weight.dtype == torch.bfloat16
    assert list(done) == ["prompts", "extract", "select", "evaluate", "report"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["timing_devices"] == dict.fromkeys(
        ["prompts", "extract", "select", "evaluate"], str(cm.device)
    )
    for key in ("baseline", "ablation", "actadd"):
        lines = (tmp_path / "run" / "completions" / f"harmful.{key}.jsonl").read_text()
        flags = [json.loads(line)["refusal"] for line in lines.splitlines()]
        assert len(flags) == 4  # 2 prompts of each of the 2 sets
        assert metrics["harmful"]["refusal_score"][key] == round(sum(flags) / len(flags), 4)
        assert math.isfinite(metrics["ce_loss"][key]) and metrics["ce_loss"][key] > 0
    assert (
        math.isfinite(metrics["harmless"]["kl_ablation"])
        and metrics["harmless"]["kl_ablation"] >= 0
    )
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    assert len(list((tmp_path / "run" / "completions").glob("*.jsonl"))) == 7
