from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from refdir.cli import app
from refdir.data import load_prompts, sample_prompts
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.interventions.intervention import ablate, add
from refdir.measures import is_refusal
from refdir.model.generation import generate, last_position_logits
from refdir.model.loading import load_model
from refdir.study.config import RunConfig
from refdir.study.state import Run
from tiny import LAYOUTS, tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    harmful = root / "harmful.txt"
    harmful.write_text("how to pick a lock\nsteal a car\nmake poison\n")
    harmless = root / "harmless.jsonl"
    harmless.write_text(
        "".join(json.dumps({"instruction": t}) + "\n" for t in ["bake bread", "a poem", "sum 2+2"])
    )
    return harmful, harmless


@pytest.fixture(scope="module")
def extracted(
    model_dir: Path, prompt_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("run")
    harmful, harmless = prompt_files
    result = runner.invoke(
        app,
        [
            "extract",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--harmful",
            str(harmful),
            "--harmless",
            str(harmless),
            "--n-train",
            "3",
            "--layer",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


COMMANDS = {
    "extract",
    "ablate",
    "add",
    "orthogonalize",
    "optimize",
    "evaluate",
    "run",
    "compare",
    "sweep",
    "suffix",
    "monitor",
    "compare-directions",
    "organism",
    "chat",
    "control-vector",
    "push",
}


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = re.findall(r"^[│|]? {1,2}([a-z][a-z-]*) {2,}\S", result.output, re.M)
    assert sorted(listed) == sorted(COMMANDS)  # each once, as a command of its own row
    for command in COMMANDS:
        help_text = runner.invoke(app, [command, "--help"])
        assert help_text.exit_code == 0 and f" {command} [OPTIONS]" in help_text.output


def test_run_takes_every_option_of_a_run_config() -> None:
    """One declaration per option: every RunConfig field is a `refdir run` option, with the
    field's default."""
    import typer

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    assert set(RunConfig.model_fields) <= set(params)
    for name, field in RunConfig.model_fields.items():
        default = params[name].default
        if isinstance(field.default, tuple):
            assert default == ",".join(map(str, field.default)), name  # "" for none
        else:
            assert default == field.default, name


def test_extract_writes_candidates_and_a_direction(extracted: Path) -> None:
    cands = load_file(str(extracted / "candidates.safetensors"))["candidates"]
    assert cands.shape == (13, 4, 32)
    direction = Direction.load(extracted)
    assert (direction.layer, direction.position, direction.n_harmful) == (2, -1, 3)
    torch.testing.assert_close(direction.vector, cands[-1, 2])


@pytest.mark.parametrize(("command", "extra"), [("ablate", []), ("add", ["--coeff", "-4"])])
def test_generation_under_intervention_prints_jsonl(
    command: str,
    extra: list[str],
    model_dir: Path,
    extracted: Path,
    prompt_files: tuple[Path, Path],
) -> None:
    args = [command, "--model", str(model_dir), *extra, "--prompts", str(prompt_files[0])]
    file = str(extracted / "direction.safetensors")
    result = runner.invoke(
        app, [*args, "--direction", file, "--n", "2", "--max-new-tokens", "6", "--json"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(records) == 2 and set(records[0]) == {"prompt", "completion"}
    # the completions the Python API gives under the same intervention, and not without it
    cm = load_model(str(model_dir))
    direction = Direction.load(extracted)
    prompts = sample_prompts(str(prompt_files[0]), 2, 0)
    assert [r["prompt"] for r in records] == prompts
    plain = generate(cm, prompts, 6, progress=False)
    with ablate(cm, direction) if command == "ablate" else add(cm, direction, -4.0):
        expected = generate(cm, prompts, 6, progress=False)
    assert [r["completion"] for r in records] == expected != plain
    every = runner.invoke(
        app, [*args, "--direction", str(extracted), "--json", "--n", "0", "--max-new-tokens", "1"]
    )
    assert every.exit_code == 0, every.output  # --n 0: all three prompts of the file
    assert len(every.stdout.strip().splitlines()) == 3


def test_evaluate_json_summary(
    model_dir: Path, extracted: Path, prompt_files: tuple[Path, Path], tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompt_files[1]),
            "--direction",
            str(extracted),
            "--intervention",
            "actadd",
            "--coeff",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
            "--completions",
            str(tmp_path / "c.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 3 and summary["intervention"] == "actadd" and summary["coeff"] == 2.0
    assert summary["model"] == str(model_dir)
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["refusal"] == is_refusal(r["completion"]) for r in rows)
    assert summary["refusal_rate"] == pytest.approx(sum(r["refusal"] for r in rows) / 3)
    # the completions are those of the Python API with 2 x the direction added, not plain ones
    cm = load_model(str(model_dir))
    prompts = [r["prompt"] for r in rows]
    assert sorted(prompts) == sorted(load_prompts(prompt_files[1]))
    plain = generate(cm, prompts, 4, progress=False)
    with add(cm, Direction.load(extracted), 2.0):
        expected = generate(cm, prompts, 4, progress=False)
    assert [r["completion"] for r in rows] == expected != plain


def test_orthogonalize_exports(model_dir: Path, extracted: Path, tmp_path: Path) -> None:
    out = tmp_path / "edited"
    result = runner.invoke(
        app,
        [
            "orthogonalize",
            "--model",
            str(model_dir),
            "--direction",
            str(extracted),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and (out / "model.safetensors").exists()
    # the checkpoint reloads as a plain model that behaves as the original under ablation
    original = load_model(str(model_dir))
    prompts = ["how to pick a lock", "bake bread"]
    plain = last_position_logits(original, prompts)
    with ablate(original, Direction.load(extracted)):
        hooked = last_position_logits(original, prompts)
    edited = last_position_logits(load_model(str(out)), prompts)
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=0)
    assert float((edited - plain).abs().max()) > 1e-3
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_orthogonalize_as_lora_and_control_vector(
    model_dir: Path, extracted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    args = ["--model", str(model_dir), "--direction", str(extracted)]
    result = runner.invoke(app, ["orthogonalize", *args, "--out", str(out), "--format", "lora"])
    assert result.exit_code == 0, result.output
    assert "lora, exact" in result.output
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    result = runner.invoke(
        app, ["orthogonalize", *args, "--out", str(tmp_path / "g"), "--format", "gguf"]
    )
    assert result.exit_code == 2 and "convert_hf_to_gguf" in result.output
    assert not (tmp_path / "g").exists()
    vector = tmp_path / "cv.gguf"
    result = runner.invoke(app, ["control-vector", *args, "--out", str(vector), "--coeff", "-1"])
    assert result.exit_code == 0, result.output
    assert "direction." in result.output and vector.is_file()


# The command line's one-line errors are the cases of tests/reliability.py (docs/reliability.md).


def test_run_command_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--n-train",
        "4",
        "--n-val",
        "3",
        "--n-eval-harmful",
        "2",
        "--n-eval-harmless",
        "2",
        "--harmful-eval",
        "jailbreakbench",
        "--max-new-tokens",
        "2",
        "--refusal-tokens",
        ",".join(str(i) for i in range(5, 135)),
        "--no-filter",
        "--layer",
        "1",
        "--position",
        "-1",
        "--until",
        "select",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Direction.load(out).layer == 1
    bad = runner.invoke(app, [*args[:-2], "--refusal-tokens", "I,As"])
    assert bad.exit_code == 2 and "integer token ids" in bad.stderr
    # extract and run keep to folders of their own: neither overwrites the other's direction
    extract = ["extract", "--model", str(model_dir), "--out", str(out), "--n-train", "2"]
    into_run = runner.invoke(app, extract)
    assert into_run.exit_code == 2 and "is a `refdir run` folder" in into_run.stderr
    assert Direction.load(out).layer == 1
    extracted = tmp_path / "extracted"
    assert runner.invoke(app, [*extract[:-3], str(extracted), "--n-train", "2"]).exit_code == 0
    into_extract = runner.invoke(app, [*args[:4], str(extracted), *args[5:]])
    assert into_extract.exit_code == 2 and "is not a refdir run folder" in into_extract.stderr


def test_run_command_sets_every_selection_number(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--model", str(model_dir), "--out", str(out), "--until", "prompts"]
    args += ["--refusal-tokens", "5,6", "--no-filter", "--n-train", "2", "--n-val", "2"]
    numbers = ["--kl-max", "0.2", "--induce-min", "-0.5", "--max-layer-fraction", "0.6"]
    numbers += ["--fallback-kl", "0.3,0.7", "--harmful-coeff", "-2", "--harmless-coeff", "1.5"]
    numbers += ["--n-ce", "8", "--random-kl", "4"]
    result = runner.invoke(app, [*args, *numbers])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["kl_max"] == 0.2 and options["induce_min"] == -0.5
    assert options["max_layer_fraction"] == 0.6 and options["fallback_kl_bounds"] == [0.3, 0.7]
    assert options["harmful_coeff"] == -2.0 and options["harmless_coeff"] == 1.5
    assert options["n_ce"] == 8 and options["n_random_kl"] == 4
    other = tmp_path / "none"
    result = runner.invoke(app, [*args[:4], str(other), *args[5:], "--fallback-kl", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((other / "config.json").read_text())["options"]["fallback_kl_bounds"] == []
    for value in ("0.3,high", "", "nan", "-1"):
        bad = runner.invoke(app, [*args, "--fallback-kl", value])
        assert bad.exit_code == 2 and "--fallback-kl: give positive numbers" in bad.stderr
    nan = runner.invoke(app, [*args, "--harmful-coeff", "nan"])
    assert nan.exit_code == 2 and nan.stderr.strip() == (
        "error: --harmful-coeff: input should be a finite number"
    )
    for flag, value in (("--random-kl", "-1"), ("--n-ce", "0"), ("--max-new-tokens", "0")):
        bad = runner.invoke(app, [*args, flag, value])
        assert bad.exit_code == 2, bad.output
        assert bad.stderr.strip().splitlines() == [
            f"error: {flag}: input should be greater than or equal to {1 if flag != '--random-kl' else 0}"
        ]


def test_the_command_line_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's malloc is told to keep freed blocks (mmap threshold 1 GiB, no trimming below
    2 GiB), unless the user turned it off or set malloc options of their own."""
    from refdir.cli.allocator import keep_freed_memory

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    for name in ("REFDIR_KEEP_FREED_MEMORY", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory(Libc())
    assert calls == [(-3, 1 << 30), (-1, 2**31 - 1)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory(Libc()) and not calls
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("REFDIR_KEEP_FREED_MEMORY", "0")
    assert not keep_freed_memory(Libc()) and not calls
    monkeypatch.delenv("REFDIR_KEEP_FREED_MEMORY")
    if sys.platform.startswith("linux"):
        assert keep_freed_memory()  # the real glibc takes both settings
    seen: list[bool] = []
    monkeypatch.setattr("refdir.cli.commands.keep_freed_memory", lambda: seen.append(True) or True)
    result = CliRunner().invoke(app, ["organism", "--help"])
    assert result.exit_code == 0 and seen == [True]


def test_run_command_takes_the_chat_format(model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
    )
    args = ["run", "--model", str(model_dir), "--until", "extract", "--no-filter"]
    args += ["--refusal-tokens", "5,6", "--n-train", "2", "--n-val", "2"]
    positions = {}
    for name, extra in (
        ("default", []),
        ("custom", ["--chat-template", str(template), "--system", "Answer briefly."]),
    ):
        out = tmp_path / name
        result = runner.invoke(app, [*args, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        options = json.loads((out / "config.json").read_text())["options"]
        positions[name] = len(Candidates.load(out / "candidates.safetensors").positions)
        if name == "custom":
            assert options["chat_template"] == template.read_text()
            assert options["system"] == "Answer briefly."
            chat = Run(RunConfig(**options), out).cm.chat  # the model the run loads
            assert chat.prefix.endswith("<|im_start|>user\n")
            assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in chat.prefix
        else:
            assert options["chat_template"] is None and options["system"] is None
    # "<|im_end|>\n<|im_start|>assistant\n" against "<|im_end|>\n<|im_start|>model\n", by byte
    assert positions == {"default": 13, "custom": 9}
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--chat-template", "nope.j2"])
    assert bad.exit_code == 2 and "--chat-template nope.j2 does not exist" in bad.stderr


def test_run_command_takes_benchmark_tasks(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (bench extra)")
    from refdir.evaluation.benchmarks import write_multiple_choice_task

    item = {"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}
    task = write_multiple_choice_task(tmp_path / "tasks", "sums", [item])
    out = tmp_path / "run"
    args = ["run", "--model", str(model_dir), "--out", str(out), "--until", "prompts"]
    args += ["--refusal-tokens", "5,6", "--no-filter", "--n-train", "2", "--n-val", "2"]
    result = runner.invoke(app, [*args, "--benchmarks", str(task), "--benchmark-limit", "3"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["benchmarks"] == [str(task)] and options["benchmark_limit"] == 3
    assert options["benchmark_path"] == []
    bad = runner.invoke(app, [*args, "--benchmarks", "sums", "--benchmark-path", "nowhere"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: benchmark task folder nowhere does not exist"


def test_the_package_and_the_command_line_import_torch_only_when_needed() -> None:
    import subprocess

    import refdir

    # a fresh interpreter (not this one, where torch is loaded): --help and option errors stay
    # fast, and names that need no torch (the run's options, prompt files) load without it
    code = (
        "import sys, refdir, refdir.cli\n"
        "print('torch' in sys.modules)\n"
        "print(type(refdir.load_prompts).__name__, type(refdir.study).__name__)\n"
        "print(refdir.RunConfig.__module__, refdir.LayoutSpec.__module__)\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == [
        "False",
        "function",
        "module",
        "refdir.study.config",
        "refdir.model.layout_spec",
        "False",
    ], run.stderr
    for name in refdir.__all__:  # each name is the one its stage's module defines
        value = getattr(refdir, name)
        assert value.__module__.startswith(refdir._SOURCES[name]), name
        assert value.__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        refdir.nothing  # noqa: B018


def test_run_refuses_bad_steps_and_hand_picks_before_any_work(
    model_dir: Path, tmp_path: Path
) -> None:
    args = ["run", "--model", str(model_dir), "--refusal-tokens", "5,6", "--no-filter"]
    for option in ("--until", "--force"):
        out = tmp_path / option.strip("-")
        bad = runner.invoke(app, [*args, "--out", str(out), option, "nope"])
        assert bad.exit_code == 2
        assert bad.stderr.strip().startswith(f"error: unknown step 'nope' for {option}; use one of")
        assert not out.exists()
    out = tmp_path / "pick"  # a new run: the model has layers 0..2 and positions -13..-1
    for layer, position in (("99", "-1"), ("1", "-14")):
        bad = runner.invoke(
            app, [*args, "--out", str(out), "--layer", layer, "--position", position]
        )
        assert bad.exit_code == 2, bad.output
        assert "--layer must be in 0..2 and --position in -13..-1" in bad.stderr
        assert not (out / "candidates.safetensors").exists()  # refused before extract


def test_suffix_refuses_a_negative_time_limit() -> None:
    args = ["suffix", "--direction", "nowhere", "--out", "x", "--max-minutes", "-1"]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --max-minutes must be 0 (no limit) or more, got -1.0"
    bad = runner.invoke(app, ["run", "--out", "x", "--suffix-max-minutes", "-1"])
    assert bad.exit_code == 2 and "--suffix-max-minutes" in bad.stderr


def test_a_layout_file_names_the_parts_the_defaults_miss(tmp_path: Path) -> None:
    folder = tmp_path / "nemotron"  # one "mixer" per layer (Mamba, attention or MLP), no "mlp"
    tiny_model("nemotron_h").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUTS["nemotron_h"]))
    evaluate = ["evaluate", "--model", str(folder), "--n", "2", "--max-new-tokens", "2"]
    missed = runner.invoke(app, evaluate)
    assert missed.exit_code == 2 and "could not find the MLP block" in missed.stderr
    assert "--layout" in missed.stderr
    result = runner.invoke(app, [*evaluate, "--layout", str(layout), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["n"] == 2
    out = tmp_path / "run"
    run = ["run", "--model", str(folder), "--layout", str(layout), "--out", str(out)]
    run += ["--until", "extract", "--refusal-tokens", "5,6", "--no-filter", "--n-train", "2"]
    result = runner.invoke(app, run)
    assert result.exit_code == 0, result.output
    assert (
        json.loads((out / "config.json").read_text())["options"]["layout"] == LAYOUTS["nemotron_h"]
    )
    assert Candidates.load(out).n_layers == 3

    def bad(text: str) -> str:
        layout.write_text(text)
        result = runner.invoke(app, [*evaluate, "--layout", str(layout)])
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        return line

    assert "did you mean 'mlp'?" in bad('{"mpl": "mixer"}')
    assert "must be a string (a regular expression) or null" in bad('{"mlp": 3}')
    assert "is not a regular expression" in bad('{"attn": "(mixer"}')
    assert "cannot both be null" in bad('{"attn": null, "mlp": null}')
    assert "non-empty JSON object" in bad("[]")
    assert "is not readable JSON" in bad("{mlp")
    missing = runner.invoke(app, [*evaluate, "--layout", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "none.json does not exist" in missing.stderr
    fresh = tmp_path / "fresh"
    bad_run = runner.invoke(app, [*run[:5], "--out", str(fresh)])  # the unreadable file
    assert bad_run.exit_code == 2 and "is not readable JSON" in bad_run.stderr
    assert not fresh.exists()


def test_a_hub_id_loads_from_the_cache_when_the_hub_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    import huggingface_hub.constants

    import refdir.hf
    import refdir.model.loading

    repo = tmp_path / "models--me--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    tiny_model("llama").save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    probe = refdir.hf.hub_reachable.__wrapped__  # the probe itself, uncached
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(refdir.model.loading, "hub_reachable", lambda: False)
    evaluate = ["evaluate", "--n", "1", "--max-new-tokens", "2", "--json", "--model"]
    start = time.perf_counter()
    assert runner.invoke(app, [*evaluate, "me/tiny"]).exit_code == 0  # no retries: offline
    missing = runner.invoke(app, [*evaluate, "me/other"])
    assert time.perf_counter() - start < 30
    assert missing.exit_code == 2 and "cannot be reached from here" in missing.stderr
    assert "hf download me/other" in missing.stderr
    assert huggingface_hub.constants.HF_HUB_OFFLINE is offline  # restored after the load
    # the probe: a closed port, an open one, and a proxy it cannot see through
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert probe(timeout=2.0) is True
    assert probe(timeout=2.0) is False  # closed now
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert probe(timeout=2.0) is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "--bogus"], "No such option: --bogus"),
        (["ablate"], "Missing option '--direction'"),
        (["evaluate", "--n", "abc"], "Invalid value for '--n'"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    from refdir.cli import entry  # the installed `refdir` command

    monkeypatch.setattr(sys, "argv", ["refdir", *argv])
    with pytest.raises(SystemExit) as stop:
        entry()
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line and line.endswith("--help"), line


def test_no_command_prints_the_usage_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from refdir.cli import entry

    monkeypatch.setattr(sys, "argv", ["refdir"])
    with pytest.raises(SystemExit) as stop:
        entry()
    assert stop.value.code == 0 and capsys.readouterr().out.count("Usage:") == 1


def test_run_takes_a_toml_config_under_the_options_given(model_dir: Path, tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(
        f'model = "{model_dir}"\nn_train = 5\nkl_max = 0.3\nrefusal_tokens = [5, 6]\n'
        'filter_prompts = false\nharmful_eval = ["harmful_test"]\n'
    )
    out = tmp_path / "run"
    args = ["run", "--config", str(study), "--out", str(out), "--until", "prompts"]
    result = runner.invoke(app, [*args, "--kl-max", "0.2"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["n_train"] == 5 and options["kl_max"] == 0.2  # the option over the file
    assert options["harmful_eval"] == ["harmful_test"] and options["refusal_tokens"] == [5, 6]
    recorded = [
        "run",
        "--config",
        str(out / "config.toml"),
        "--out",
        str(out),
        "--until",
        "prompts",
    ]
    again = runner.invoke(app, recorded)
    assert again.exit_code == 0, again.output  # the recorded config is the same run: nothing to do
    assert not re.search(r"^prompts +[\d.]+ s$", again.stdout, re.M)
    study.write_text("n_train = 0\n")
    bad = runner.invoke(app, [*args])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --n-train: input should be")


@pytest.mark.parametrize("text", ['{"mlp": 3}', '{"attn_out": ["o_proj"]}', '{"layers": 1.5}'])
def test_a_layout_value_that_is_not_a_string_is_named_by_run_and_evaluate(
    model_dir: Path, tmp_path: Path, text: str
) -> None:
    """Both commands refuse it in one line naming the field, before any model loads."""
    field = next(iter(json.loads(text)))
    layout = tmp_path / "layout.json"
    layout.write_text(text)
    study = tmp_path / "study.toml"
    study.write_text(f"layout = '{text}'\n")
    out = tmp_path / "run"
    for args in (
        ["evaluate", "--model", str(model_dir), "--layout", str(layout)],
        ["run", "--model", str(model_dir), "--layout", str(layout), "--out", str(out)],
        ["run", "--model", str(model_dir), "--config", str(study), "--out", str(out)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: --layout: layout field") and f"'{field}'" in line, line
        assert "must be a string (a regular expression)" in line
        assert not out.exists()


def test_control_characters_in_prompts_and_completions_are_printed_as_escapes(
    model_dir: Path, extracted: Path, tmp_path: Path
) -> None:
    """A prompt file (or a model) cannot drive the terminal: no ESC, BEL or C1 byte reaches
    it from `refdir ablate`, `add` or `evaluate` (``color=True``: click keeps escape sequences,
    as on a terminal)."""
    prompts = tmp_path / "esc\x1b]0;title\x07.txt"
    prompts.write_text("say \x1b[31mred\x1b[0m please\nbell \x07, csi \x9b2J, del \x7f done\n")
    control = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8"]
    direction = ["--direction", str(extracted)]
    for args in (["ablate", *direction], ["add", *direction, "--coeff", "2"], ["evaluate"]):
        result = runner.invoke(app, [*args, *common], color=True)
        assert result.exit_code == 0, result.output
        assert not control.search(result.stdout), (args[0], result.stdout)
        if args[0] == "evaluate":  # the summary names the file
            assert "esc\\x1b]0;title\\x07.txt" in result.stdout
        else:
            assert "### say \\x1b[31mred\\x1b[0m please" in result.stdout
            assert "bell \\x07, csi \\x9b2J, del \\x7f done" in result.stdout
    from refdir.cli.text import printable

    assert printable("a\tb\nc\x00\x7f\x80\x9f\xa0é") == "a\tb\nc\\x00\\x7f\\x80\\x9f\xa0é"
