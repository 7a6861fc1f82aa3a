"""A run folder cannot be corrupted: a run takes only a new or empty folder or a run folder of
its own, one run at a time works in it, a resume cannot mix devices or precisions, a forced
step that fails leaves no later results, and a run that fails at its start leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import filelock
import pytest
import torch
from typer.testing import CliRunner

from refdir.artifacts.run import ConfigRecord, RunMarker
from refdir.cli import app
from refdir.errors import RefdirError
from refdir.study.folder import LOCK
from refdir.study.run import run_pipeline
from tiny import TINY_RUN, tiny_chat_model, tiny_model, tiny_tokenizer

OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_model_folder_is_not_taken_for_a_run_folder(tmp_path: Path) -> None:
    """A copy of a Hugging Face model folder given as `out` stays as it was (its own
    config.json is not overwritten) and still loads."""
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    before = _files(folder)
    with pytest.raises(RefdirError, match=r"is not a refdir run folder \(it holds .*config\.json"):
        run_pipeline(TINY_RUN, folder, progress=False, model=tiny_chat_model("llama"))
    assert _files(folder) == before
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("mine")
    with pytest.raises(RefdirError, match="not a refdir run folder"):
        run_pipeline(TINY_RUN, unrelated, progress=False, model=tiny_chat_model("llama"))
    assert _files(unrelated) == {"todo.txt": b"mine"}
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(RefdirError, match="exists and is not a folder"):
        run_pipeline(TINY_RUN, a_file, progress=False, model=tiny_chat_model("llama"))


def test_a_run_marks_its_folder_and_resumes_one_of_0_1_0(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pipeline(TINY_RUN, out, progress=False, model=tiny_chat_model("llama"), until="prompts")
    assert RunMarker.read(out).created_by.startswith("refdir ")
    old = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))  # a run folder without the marker
    from refdir.study.folder import claim

    assert claim(old) is False and claim(tmp_path / "new") is True
    (tmp_path / "empty").mkdir()
    assert claim(tmp_path / "empty") is True


def test_one_run_at_a_time_works_in_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cm = tiny_chat_model("llama")
    run_pipeline(TINY_RUN, out, progress=False, model=cm, until="prompts")
    before = _files(out)
    with (
        filelock.FileLock(out / LOCK, timeout=0),  # another run holds the folder
        pytest.raises(RefdirError, match=r"is in use by another refdir run; wait"),
    ):
        run_pipeline(TINY_RUN, out, progress=False, model=cm)
    assert _files(out) == before  # nothing was written or removed
    assert set(run_pipeline(TINY_RUN, out, progress=False, model=cm, until="extract")) == {
        "extract"
    }  # the lock was released


def test_a_resume_cannot_mix_precisions_or_devices(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pipeline(TINY_RUN, out, progress=False, model=tiny_chat_model("llama"), until="extract")
    assert ConfigRecord.read(out).numerics is not None
    half = tiny_chat_model("llama")
    half.model.to(torch.bfloat16)
    before = _files(out)
    with pytest.raises(
        RefdirError, match=r"computed in float32 on cpu; this one would compute in bfloat16"
    ):
        run_pipeline(TINY_RUN, out, progress=False, model=half)
    assert _files(out) == before
    done = run_pipeline(TINY_RUN, out, progress=False, model=half, force="prompts", until="prompts")
    assert set(done) == {"prompts"} and ConfigRecord.read(out).numerics.dtype == "bfloat16"  # type: ignore[union-attr]


def test_a_forced_step_that_fails_leaves_no_later_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cm = tiny_chat_model("llama")
    run_pipeline(TINY_RUN, out, progress=False, model=cm)
    assert (out / "metrics.json").exists() and (out / "report.html").exists()
    strict = TINY_RUN.model_copy(update={"kl_max": -1.0, "fallback_kl_bounds": ()})
    with pytest.raises(RefdirError, match="no candidate passes"):
        run_pipeline(strict, out, progress=False, model=cm, force="prompts")
    for name in ("metrics.json", "report.html", "direction.safetensors", "direction.json"):
        assert not (out / name).exists(), name
    assert not list((out / "completions").glob("*.jsonl"))


def test_a_run_that_fails_at_its_start_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "run"
    bad = TINY_RUN.model_copy(update={"refusal_tokens": None, "n_refusal_probe": 1})
    with pytest.raises(RefdirError, match="refused none"):  # a random model refuses nothing
        run_pipeline(bad, out, progress=False, model=tiny_chat_model("llama"))
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone too


runner = CliRunner()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--dtype", "float8", "--dtype: unknown dtype 'float8'; use one of auto, float32"),
        ("--device", "gpu", "--device: unknown device 'gpu'; use cpu, cuda, cuda:N or auto"),
    ],
)
def test_a_bad_device_or_dtype_leaves_no_folder(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--out", str(out), flag, value])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}")
    assert "\n" not in result.stderr.strip()
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--out", str(out), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU is visible" in result.stderr
    assert not out.exists()


def test_extract_refuses_a_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pipeline(TINY_RUN, out, progress=False, model=tiny_chat_model("llama"), until="prompts")
    (out / ConfigRecord.FILE).unlink()  # the marker alone makes it a run folder
    result = runner.invoke(app, ["extract", "--out", str(out)])
    assert result.exit_code == 2 and "is a `refdir run` folder" in result.stderr
    assert json.loads((out / RunMarker.FILE).read_text())["refdir_run"] == 1


def test_damaged_files_in_a_run_folder_name_the_step_that_makes_them(tmp_path: Path) -> None:
    from refdir.report.run_report import write_report

    out = tmp_path / "run"
    cm = tiny_chat_model("llama")
    run_pipeline(TINY_RUN, out, progress=False, model=cm)
    (out / "candidates.safetensors").write_bytes(b"damaged")
    with pytest.raises(
        RefdirError, match=r"not a candidates file .*; redo it with `force='extract'`"
    ):
        run_pipeline(TINY_RUN, out, progress=False, model=cm, force="select")
    run_pipeline(TINY_RUN, out, progress=False, model=cm, force="extract")
    (out / "direction.safetensors").write_bytes(b"damaged")
    with pytest.raises(RefdirError, match=r"not a safetensors file .*`force='select'`"):
        write_report(out)
