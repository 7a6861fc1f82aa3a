"""The faults and bad inputs of ``docs/reliability.md``, each with what refdir does about it.

A :class:`Case` is a command a user would type, run through the command line in this process on
tiny models, with the exit code and the one ``error:`` line it prints; ``test_reliability.py``
runs every case and checks its line against the table, word for word, and that the command left
nothing behind. A :class:`Fault` needs a process of its own (a signal, a file-size limit, a full
disk, two runs at once) or is not an error at all (a spreadsheet formula in a label); the test
named with it meets it for real and checks the line the table shows.

    python tests/reliability.py      # run every case and write docs/reliability.md again

Paths in the table are written as ``<model>`` (a tiny model folder), ``<direction>`` (a
direction extracted from it), ``<bench>`` (the other files the cases share) and ``<tmp>`` (the
case's own empty folder).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from typer.testing import CliRunner

from refdir.cli import app
from refdir.directions.direction import Direction
from tiny import (  # tests/ is on the path, as a script too
    CHATML_SYSTEM,
    LAYOUTS,
    VOCAB,
    tiny_model,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "reliability.md"

RUN = ["--refusal-tokens", "5,6", "--no-filter", "--n-train", "3", "--n-val", "3"]
"""`refdir run` options that make its first steps take a second on a tiny model."""


@dataclass(frozen=True)
class Bench:
    """What the cases point at: ``root`` holds the shared files (built once), ``tmp`` is the
    case's own folder, empty when the case starts."""

    root: Path
    tmp: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def model(self) -> list[str]:
        return ["--model", str(self.model_dir)]

    @property
    def direction(self) -> list[str]:
        return ["--direction", str(self.root / "direction")]

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def write(self, name: str, text: str | bytes) -> str:
        """A file of the case's own, with ``text`` in it; its path."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return str(path)

    def run(self, out: str, *extra: str) -> list[str]:
        return ["run", *self.model, "--out", out, *RUN, *extra]


Setup = Callable[[Bench], AbstractContextManager[object] | None]


@dataclass(frozen=True)
class Case:
    """A bad input met through the command line: ``argv`` (after ``setup``, which may hold
    something for the command's time) must exit with ``code`` and print one ``error:`` line
    holding ``expect``, and leave the case's folder as it found it."""

    group: str
    fault: str
    argv: Callable[[Bench], list[str]]
    expect: str
    setup: Setup | None = None
    code: int = 2
    also: str | None = None
    """A test that checks more of the same fault (what is left, what happens after)."""


@dataclass(frozen=True)
class Fault:
    """A fault met for real by ``test`` (a child process, a signal, a limit); ``line`` is what
    it prints (``None``: no error line), which the test checks against this table."""

    group: str
    fault: str
    how: str
    code: int
    line: str | None
    test: str
    does: str = ""


@dataclass(frozen=True)
class Outcome:
    """What one case did: its exit code and error lines, paths normalised."""

    code: int
    errors: list[str]
    traceback: bool
    changed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the shared files


def build_bench(root: Path) -> None:
    """The tiny model, a direction extracted from it, another model of the same width, a model
    whose folder asks to run its own code, a model with damaged weights, and two that a
    reference for the KL cannot be: one of another vocabulary, one whose chat template adds a
    system prompt."""
    model = root / "model"
    tiny_model("qwen2").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    result = CliRunner().invoke(
        app, ["extract", "--model", str(model), "--out", str(root / "direction"), "--n-train", "3"]
    )
    assert result.exit_code == 0, result.output
    other = root / "other"
    tiny_model("qwen2", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    custom = root / "custom"
    tiny_model("llama").save_pretrained(custom)
    tiny_tokenizer().save_pretrained(custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "refdir_custom"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_custom.py").write_text("raise SystemExit('this code ran')\n")
    damaged = root / "damaged"
    damaged.mkdir()
    for item in model.iterdir():
        (damaged / item.name).write_bytes(item.read_bytes())
    (damaged / "model.safetensors").write_text("garbage")
    nemotron = root / "nemotron"
    tiny_model("nemotron_h").save_pretrained(nemotron)
    tiny_tokenizer().save_pretrained(nemotron)
    (root / "layout.json").write_text(json.dumps(LAYOUTS["nemotron_h"]))
    wide = root / "wide"
    tiny_model("qwen2", vocab_size=VOCAB + 8).save_pretrained(wide)
    tiny_tokenizer().save_pretrained(wide)
    system = root / "system"
    tiny_model("qwen2").save_pretrained(system)
    tiny_tokenizer(CHATML_SYSTEM).save_pretrained(system)


# --------------------------------------------------------------------------- setups


def _run_until(step: str, *extra: str) -> Setup:
    """A run folder ``<tmp>/run`` whose steps up to ``step`` are done."""

    def setup(b: Bench) -> None:
        done = CliRunner().invoke(app, [*b.run(b.path("run"), *extra), "--until", step])
        assert done.exit_code == 0, done.output

    return setup


def _damaged(step: str, file: str) -> Setup:
    def setup(b: Bench) -> None:
        _run_until(step)(b)
        (b.tmp / "run" / file).write_bytes(b"damaged")

    return setup


def _edited_prompts(b: Bench) -> None:
    _run_until("prompts")(b)
    path = b.tmp / "run" / "prompts.json"
    sets = json.loads(path.read_text())
    sets["harmful_train"][0] = "a \ud800 b"
    path.write_text(json.dumps(sets))


def _locked(b: Bench) -> AbstractContextManager[object]:
    """A run folder whose lock another process holds (a second lock on the file, as another
    process's would be: flock locks belong to the open file, not the process)."""
    _run_until("prompts")(b)
    return _holding(b.tmp / "run" / ".refdir-run.lock")


@contextmanager
def _holding(path: Path) -> Iterator[None]:
    lock = FileLock(path, timeout=0)
    with lock:
        yield


def _model_copy(b: Bench) -> None:
    """A copy of a Hugging Face model folder."""
    for item in b.model_dir.iterdir():
        b.write(f"hf/{item.name}", item.read_bytes())


def _overflow(b: Bench) -> None:
    """A direction file whose entries fit float32 but whose norm does not."""
    Direction(torch.ones(32), 1, -1, "tiny").save(b.tmp / "huge")
    save_file({"direction": torch.full((32,), 1e38)}, str(b.tmp / "huge" / "direction.safetensors"))


def _pickled(b: Bench) -> None:
    """A direction folder holding a pickle (``torch.save``), not safetensors."""
    (b.tmp / "pickled").mkdir()
    torch.save({"direction": torch.ones(32)}, b.tmp / "pickled" / "direction.pt")


def _small(b: Bench) -> None:
    Direction(torch.ones(8), 1, -1, "other").save(b.tmp / "small")


def _other_tensor(b: Bench) -> None:
    """A direction folder whose safetensors file holds another tensor."""
    Direction(torch.ones(32), 1, -1, "tiny").save(b.tmp / "other")
    save_file({"x": torch.ones(32)}, str(b.tmp / "other" / "direction.safetensors"))


def _recipe(name: str, text: str) -> Callable[[Bench], list[str]]:
    def argv(b: Bench) -> list[str]:
        return ["organism", "build", "--out", b.path("o"), "--recipe", b.write(name, text)]

    return argv


# --------------------------------------------------------------------------- the cases

OPTIONS, MODELS, DIRECTIONS, PROMPTS, FOLDERS, FILES, MACHINE, OUTPUT = (
    "Options",
    "Models",
    "Directions",
    "Prompt files",
    "Run folders and resuming",
    "Other files refdir reads",
    "The machine: signals, disk, other processes",
    "What refdir writes and prints",
)

CASES: dict[str, Case] = {
    # ----- options
    "unknown-prompt-set": Case(
        OPTIONS,
        "a prompt set that is neither a file nor packaged",
        lambda b: ["evaluate", *b.model, "--prompts", "no_such_set"],
        "no such file or packaged set",
    ),
    "ablate-without-direction": Case(
        OPTIONS,
        "`--intervention ablate` without a direction",
        lambda b: ["evaluate", *b.model, "--intervention", "ablate"],
        "needs --direction",
    ),
    "direction-without-intervention": Case(
        OPTIONS,
        "a direction given to `evaluate` with no intervention",
        lambda b: ["evaluate", *b.model, *b.direction],
        "--intervention is none; add --intervention",
    ),
    "unknown-intervention": Case(
        OPTIONS,
        "an unknown intervention",
        lambda b: ["evaluate", *b.model, "--intervention", "bogus"],
        "unknown intervention 'bogus'",
    ),
    "layer-past-model": Case(
        OPTIONS,
        "a layer past the model's last",
        lambda b: ["extract", *b.model, "--out", b.path("e"), "--layer", "99"],
        "--layer must be in",
    ),
    "position-past-template": Case(
        OPTIONS,
        "a position before the post-instruction tokens",
        lambda b: ["extract", *b.model, "--out", b.path("e"), "--position", "-99"],
        "--position must be in -13..-1",
    ),
    "same-set-twice": Case(
        OPTIONS,
        "the same prompt set as harmful and harmless",
        lambda b: ["extract", *b.model, "--out", b.path("s"), "--harmful", "harmless_train"],
        "name the same set",
    ),
    "coefficient-nan": Case(
        OPTIONS,
        "a coefficient that is not a finite number",
        lambda b: ["add", *b.model, *b.direction, "--coeff", "nan", "--n", "1"],
        "--coeff must be a finite number",
    ),
    "no-new-tokens": Case(
        OPTIONS,
        "zero new tokens to generate",
        lambda b: ["evaluate", *b.model, "--max-new-tokens", "0", "--n", "1"],
        "--max-new-tokens must be 1 or more, got 0",
    ),
    "no-batch": Case(
        OPTIONS,
        "a batch size of 0",
        lambda b: ["ablate", *b.model, *b.direction, "--batch-size", "0"],
        "--batch-size must be 1 or more",
    ),
    "no-threads": Case(
        OPTIONS,
        "0 threads for the organism build",
        lambda b: ["organism", "build", "--out", b.path("o"), "--threads", "0"],
        "--threads must be 1 or more",
    ),
    "no-heads": Case(
        OPTIONS,
        "0 attention heads to analyse",
        lambda b: ["suffix", *b.model, *b.direction, "--out", b.path("x"), "--top-heads", "0"],
        "--top-heads must be 1 or more",
    ),
    "negative-steps": Case(
        OPTIONS,
        "a negative number of suffix steps",
        lambda b: ["suffix", *b.direction, "--out", b.path("x"), "--steps", "-1"],
        "--steps must be positive, got -1",
    ),
    "negative-minutes": Case(
        OPTIONS,
        "a negative time limit for the suffix search",
        lambda b: ["suffix", *b.direction, "--out", b.path("x"), "--max-minutes", "-1"],
        "--max-minutes must be 0 (no limit) or more, got -1.0",
    ),
    "unknown-step": Case(
        OPTIONS,
        "an unknown step for `--force`",
        lambda b: b.run(b.path("run"), "--force", "nope"),
        "unknown step 'nope' for --force; use one of",
    ),
    "hand-pick-past-model": Case(
        OPTIONS,
        "a hand-picked layer past the model, given to a new run",
        lambda b: b.run(b.path("run"), "--layer", "99", "--position", "-1"),
        "--layer must be in 0..2 and --position in -13..-1",
    ),
    "token-ids-not-integers": Case(
        OPTIONS,
        "refusal tokens that are not integer ids",
        lambda b: [*b.run(b.path("run")), "--refusal-tokens", "I,As"],
        "integer token ids",
    ),
    "bad-dtype": Case(
        OPTIONS,
        "an unknown dtype",
        lambda b: b.run(b.path("run"), "--dtype", "float8"),
        "--dtype: unknown dtype 'float8'; use one of auto, float32",
        also="test_run_folder.py::test_a_bad_device_or_dtype_leaves_no_folder",
    ),
    "bad-device": Case(
        OPTIONS,
        "an unknown device",
        lambda b: b.run(b.path("run"), "--device", "gpu"),
        "--device: unknown device 'gpu'; use cpu, cuda, cuda:N or auto",
        also="test_run_folder.py::test_a_bad_device_or_dtype_leaves_no_folder",
    ),
    "gguf-for-organism": Case(
        OPTIONS,
        "a GGUF file name given with the bundled organism",
        lambda b: ["evaluate", "--gguf-file", "x.gguf"],
        "--gguf-file names a file inside a model folder, not the organism",
    ),
    "missing-chat-template": Case(
        OPTIONS,
        "a chat template file that does not exist",
        lambda b: ["ablate", *b.model, *b.direction, "--chat-template", "nope.j2"],
        "--chat-template nope.j2 does not exist",
    ),
    "chat-template-folder": Case(
        OPTIONS,
        "a folder given as the chat template",
        lambda b: ["ablate", *b.model, *b.direction, "--chat-template", str(b.tmp)],
        "is a folder; give a file",
    ),
    # ----- models
    "missing-model": Case(
        MODELS,
        "a model folder that does not exist",
        lambda b: ["evaluate", "--model", b.path("missing")],
        "no such model folder or file",
    ),
    "damaged-weights": Case(
        MODELS,
        "a model folder with damaged weights",
        lambda b: ["evaluate", "--model", str(b.root / "damaged")],
        "could not load model",
    ),
    "file-not-gguf": Case(
        MODELS,
        "a file given as the model that is not a GGUF",
        lambda b: ["evaluate", "--model", b.write("a-file", "not a model")],
        "is a file but not a .gguf",
    ),
    "remote-code": Case(
        MODELS,
        "a model whose folder asks to run its own code",
        lambda b: ["evaluate", "--model", str(b.root / "custom"), "--n", "1"],
        "allow it with --trust-remote-code, only for a model you trust",
        also="test_remote_code.py",
    ),
    "layout-missed": Case(
        MODELS,
        "a family whose blocks the default layout does not find",
        lambda b: ["evaluate", "--model", str(b.root / "nemotron"), "--n", "1"],
        "could not find the MLP block",
        also="test_cli.py::test_a_layout_file_names_the_parts_the_defaults_miss",
    ),
    "layout-not-string": Case(
        MODELS,
        "a layout file field that is not a string",
        lambda b: [
            *["run", "--model", str(b.root / "nemotron"), "--out", b.path("run")],
            *["--layout", b.write("layout.json", '{"mlp": 3}')],
        ],
        "layout field 'mlp' must be a string (a regular expression) or null",
    ),
    "layout-typo": Case(
        MODELS,
        "a layout file field misspelt",
        lambda b: [
            *["evaluate", "--model", str(b.root / "nemotron")],
            *["--layout", b.write("layout.json", '{"mpl": "mixer"}')],
        ],
        "did you mean 'mlp'?",
    ),
    "layout-ambiguous": Case(
        MODELS,
        "a layout pattern that a later Python will read otherwise (`[[`)",
        lambda b: [
            *["evaluate", "--model", str(b.root / "nemotron")],
            *["--layout", b.write("layout.json", '{"mlp": "[[a]"}')],
        ],
        "is ambiguous (Possible nested set at position 1)",
    ),
    "layout-not-json": Case(
        MODELS,
        "a layout file that is not JSON",
        lambda b: ["evaluate", *b.model, "--layout", b.write("layout.json", "{mlp")],
        "is not readable JSON",
    ),
    "prompt-past-context": Case(
        MODELS,
        "a prompt longer than the model's context",
        lambda b: [
            *["evaluate", *b.model, "--max-new-tokens", "1"],
            *["--prompts", b.write("long.txt", "short\n" + "word " * 60 + "\n")],
        ],
        "longer than the model's context of 256",
        also="test_generation.py::test_a_prompt_longer_than_the_context_is_refused_at_once",
    ),
    "missing-reference": Case(
        MODELS,
        "a reference for the KL that does not exist",
        lambda b: ["evaluate", *b.model, "--reference", b.path("missing"), "--n", "1"],
        "--reference: no such model folder or file",
    ),
    "reference-other-vocabulary": Case(
        MODELS,
        "a reference for the KL with another vocabulary",
        lambda b: ["evaluate", *b.model, "--reference", str(b.root / "wide"), "--n", "1"],
        "the KL needs one vocabulary",
        also="test_reference.py::test_a_reference_of_another_vocabulary_is_one_line",
    ),
    "reference-other-tokens": Case(
        MODELS,
        "a reference for the KL whose chat template gives the prompts other tokens",
        lambda b: ["evaluate", *b.model, "--reference", str(b.root / "system"), "--n", "1"],
        "the KL needs the same tokens",
        also="test_reference.py::test_a_reference_of_another_vocabulary_is_one_line",
    ),
    # ----- directions
    "missing-direction": Case(
        DIRECTIONS,
        "a direction folder without a direction",
        lambda b: ["ablate", *b.model, "--direction", str(b.tmp)],
        "direction.safetensors is missing",
    ),
    "pickled-direction": Case(
        DIRECTIONS,
        "a direction saved as a pickle",
        lambda b: ["ablate", *b.model, "--direction", b.path("pickled")],
        "direction.safetensors is missing",
        setup=_pickled,
    ),
    "direction-other-size": Case(
        DIRECTIONS,
        "a direction of another width",
        lambda b: ["ablate", *b.model, "--direction", b.path("small")],
        "size 8",
        setup=_small,
    ),
    "direction-other-model": Case(
        DIRECTIONS,
        "a direction from another model of the same width",
        lambda b: ["ablate", "--model", str(b.root / "other"), *b.direction, "--n", "1"],
        "apply it anyway with --any-model",
        also="test_model_signature.py",
    ),
    "direction-overflows": Case(
        DIRECTIONS,
        "a direction whose norm overflows float32",
        lambda b: ["ablate", *b.model, "--direction", b.path("huge"), "--any-model"],
        "overflows float32",
        setup=_overflow,
        also="test_model_signature.py::test_a_direction_whose_norm_overflows_float32_is_refused",
    ),
    "direction-other-tensor": Case(
        DIRECTIONS,
        "a direction file holding another tensor",
        lambda b: ["suffix", *b.model, "--direction", b.path("other"), "--out", b.path("x")],
        "holds no tensor named 'direction'",
        setup=_other_tensor,
    ),
    "direction-damaged": Case(
        DIRECTIONS,
        "a damaged direction file",
        lambda b: [
            *["add", *b.model, "--direction"],
            str(Path(b.write("bad/direction.safetensors", b"\x00garbage")).parent),
        ],
        "is not a safetensors file",
    ),
    # ----- prompt files
    "prompts-lone-surrogate": Case(
        PROMPTS,
        "a prompt that is a lone surrogate (valid JSON)",
        lambda b: ["evaluate", *b.model, "--prompts", b.write("p.json", '["a \\ud800 b"]')],
        "lone surrogate",
        also="test_readers.py",
    ),
    "prompts-empty-string": Case(
        PROMPTS,
        "an empty prompt",
        lambda b: ["evaluate", *b.model, "--prompts", b.write("p.json", '["fine", ""]')],
        "is empty",
        also="test_readers.py",
    ),
    "prompts-whitespace": Case(
        PROMPTS,
        "a prompt of whitespace only",
        lambda b: ["evaluate", *b.model, "--prompts", b.write("p.json", '["fine", " \\t "]')],
        "whitespace",
    ),
    "prompts-not-utf8": Case(
        PROMPTS,
        "a prompt file that is not UTF-8",
        lambda b: ["evaluate", *b.model, "--prompts", b.write("p.txt", b"fine\n\xff\xfe\n")],
        "is not UTF-8",
    ),
    "prompts-no-prompts": Case(
        PROMPTS,
        "a prompt file with no prompts",
        lambda b: ["evaluate", *b.model, "--prompts", b.write("p.txt", "\n\n")],
        "no prompts",
    ),
    "prompts-bad-jsonl": Case(
        PROMPTS,
        "a JSONL prompt file with a damaged line",
        lambda b: [
            *["evaluate", *b.model, "--prompts"],
            b.write("p.jsonl", '{"instruction": "fine"}\n{"instruction": \n'),
        ],
        "p.jsonl",
    ),
    "prompts-extract-empty": Case(
        PROMPTS,
        "`extract` given a harmful file of empty prompts",
        lambda b: [
            *["extract", *b.model, "--out", b.path("e")],
            *["--harmful", b.write("h.json", '["", ""]')],
        ],
        "is empty",
        also="test_extract.py",
    ),
    # ----- run folders
    "run-into-model-folder": Case(
        FOLDERS,
        "`run --out` a Hugging Face model folder (its config.json would be overwritten)",
        lambda b: b.run(b.path("hf")),
        "is not a refdir run folder",
        setup=_model_copy,
        also="test_run_folder.py::test_a_model_folder_is_not_taken_for_a_run_folder",
    ),
    "run-into-other-files": Case(
        FOLDERS,
        "`run --out` a folder of unrelated files",
        lambda b: b.run(str(Path(b.write("notes/todo.txt", "x")).parent)),
        "is not a refdir run folder",
    ),
    "run-into-file": Case(
        FOLDERS,
        "`run --out` a file",
        lambda b: b.run(b.write("a-file", "x")),
        "exists and is not a folder",
    ),
    "run-into-extract-folder": Case(
        FOLDERS,
        "`run --out` a `refdir extract` folder (its direction would be replaced)",
        lambda b: b.run(str(b.root / "direction")),
        "is not a refdir run folder",
    ),
    "extract-into-run-folder": Case(
        FOLDERS,
        "`extract --out` a run folder",
        lambda b: ["extract", *b.model, "--out", b.path("run"), "--n-train", "3"],
        "is a `refdir run` folder",
        setup=_run_until("prompts"),
        also="test_run_folder.py::test_extract_refuses_a_run_folder",
    ),
    "run-folder-in-use": Case(
        FOLDERS,
        "a run folder another run is working in",
        lambda b: b.run(b.path("run")),
        "is in use by another refdir run",
        setup=_locked,
        also="test_faults.py::test_two_runs_on_one_folder_one_is_refused",
    ),
    "resume-other-options": Case(
        FOLDERS,
        "a resume with another option that changes results",
        lambda b: b.run(b.path("run"), "--seed", "7"),
        "seed",
        setup=_run_until("prompts"),
        also="test_pipeline.py::test_changed_options_are_refused_on_resume",
    ),
    "resume-other-dtype": Case(
        FOLDERS,
        "a resume in another dtype",
        lambda b: b.run(b.path("run"), "--dtype", "bfloat16"),
        "computed in float32 on cpu; this one would compute in bfloat16 on cpu",
        setup=_run_until("prompts"),
        also="test_run_folder.py::test_a_resume_cannot_mix_precisions_or_devices",
    ),
    "damaged-candidates": Case(
        FOLDERS,
        "a damaged `candidates.safetensors` in a run folder",
        lambda b: [*b.run(b.path("run")), "--until", "select"],
        "redo it with --force extract",
        setup=_damaged("extract", "candidates.safetensors"),
        also="test_run_folder.py::test_damaged_files_in_a_run_folder_name_the_step_that_makes_them",
    ),
    "damaged-prompts": Case(
        FOLDERS,
        "a damaged `prompts.json` in a run folder",
        lambda b: [*b.run(b.path("run")), "--until", "extract"],
        "--force prompts",
        setup=_damaged("prompts", "prompts.json"),
    ),
    "prompts-json-edited": Case(
        FOLDERS,
        "a run folder's `prompts.json` edited to hold a lone surrogate",
        lambda b: [*b.run(b.path("run")), "--until", "extract"],
        "harmful_train: prompt 0 is not valid Unicode text",
        setup=_edited_prompts,
    ),
    "config-not-toml": Case(
        FOLDERS,
        "a `--config` file that is not TOML",
        lambda b: ["run", "--out", b.path("run"), "--config", b.write("c.toml", "n_train = ")],
        "c.toml",
    ),
    "config-unknown-key": Case(
        FOLDERS,
        "a `--config` file with an unknown option",
        lambda b: ["run", "--out", b.path("run"), "--config", b.write("c.toml", "n_trian = 4\n")],
        "n_trian",
    ),
    # ----- other files
    "recipe-typo": Case(
        FILES,
        "an organism recipe with a misspelt field",
        _recipe("typo.json", '{"lora_rankk": 3}'),
        "typo.json: lora_rankk: Extra inputs",
    ),
    "recipe-not-object": Case(
        FILES,
        "an organism recipe that is not an object",
        _recipe("list.json", "[1]"),
        "must be a JSON object of recipe fields",
    ),
    "recipe-rank": Case(
        FILES,
        "an organism recipe with a LoRA rank of 0",
        _recipe("rank.json", '{"lora_rank": 0}'),
        "rank.json: lora_rank: Input should be greater than or equal to 1",
    ),
    "recipe-repeats": Case(
        FILES,
        "an organism recipe out of range",
        _recipe("repeats.json", '{"harmful_repeats": 13}'),
        "harmful_repeats: Input should be less than or equal to 12",
    ),
    "compare-not-a-run": Case(
        FILES,
        "`compare` given a folder that is not a finished run",
        lambda b: ["compare", str(b.tmp), "--out", b.path("cmp")],
        "not a finished run",
    ),
    # ----- outputs
    "completions-into-folder": Case(
        OUTPUT,
        "`--completions` naming a folder",
        lambda b: ["evaluate", *b.model, "--completions", str(b.tmp)],
        "is a folder; give a .jsonl",
    ),
    "completions-in-proc": Case(
        OUTPUT,
        "`--completions` where nothing can be written",
        lambda b: ["evaluate", *b.model, "--completions", "/proc/o.jsonl"],
        "cannot write in /proc",
    ),
    "completions-folder-made-then-fail": Case(
        OUTPUT,
        "a failure after `--completions` made its folders",
        lambda b: [
            *["evaluate", *b.model, "--intervention", "ablate"],
            *["--direction", b.path("no"), "--completions", b.path("c/d/o.jsonl")],
        ],
        "direction.safetensors is missing",
    ),
    "extract-into-file": Case(
        OUTPUT,
        "`extract --out` a file",
        lambda b: ["extract", *b.model, "--out", b.write("a-file", "x")],
        "exists and is not a folder",
    ),
    "extract-into-proc": Case(
        OUTPUT,
        "`extract --out` where no folder can be made",
        lambda b: ["extract", *b.model, "--out", "/proc/x"],
        "cannot create the folder /proc/x",
    ),
    "export-into-file": Case(
        OUTPUT,
        "`orthogonalize --out` a file",
        lambda b: ["orthogonalize", *b.model, *b.direction, "--out", b.write("a-file", "x")],
        "exists and is not an empty folder",
    ),
    "export-into-proc": Case(
        OUTPUT,
        "`orthogonalize --out` where nothing can be written",
        lambda b: ["orthogonalize", *b.model, *b.direction, "--out", "/proc/x"],
        "cannot write in /proc",
    ),
    "export-format": Case(
        OPTIONS,
        "an export format refdir does not write",
        lambda b: [
            "orthogonalize",
            *b.model,
            *b.direction,
            "--out",
            b.path("o"),
            "--format",
            "onnx",
        ],
        "unknown export format 'onnx'",
    ),
    "export-gguf-type": Case(
        OPTIONS,
        "a GGUF tensor type the gguf package does not write",
        lambda b: [
            "orthogonalize",
            *b.model,
            *b.direction,
            "--out",
            b.path("o"),
            "--format",
            "gguf",
            "--gguf-type",
            "Q4_K_M",
        ],
        "unknown GGUF type 'Q4_K_M'",
    ),
    "export-gguf-from-safetensors": Case(
        MODELS,
        "a GGUF export of a model that was not loaded from a GGUF",
        lambda b: [
            "orthogonalize",
            *b.model,
            *b.direction,
            "--out",
            b.path("o"),
            "--format",
            "gguf",
        ],
        "convert it with llama.cpp's convert_hf_to_gguf.py",
    ),
    "control-vector-name": Case(
        OUTPUT,
        "`control-vector --out` not a .gguf file",
        lambda b: ["control-vector", *b.model, *b.direction, "--out", b.path("cv.bin")],
        "does not end in .gguf",
    ),
    "push-no-folder": Case(
        FILES,
        "`push` of a folder that does not exist",
        lambda b: ["push", b.path("nothing"), "--repo-id", "someone/model"],
        "is not a folder with files",
    ),
    "suffix-into-file": Case(
        OUTPUT,
        "`suffix --out` a file",
        lambda b: ["suffix", *b.model, *b.direction, "--out", b.write("a-file", "x")],
        "exists and is not a folder",
    ),
    "build-into-file": Case(
        OUTPUT,
        "`organism build --out` a file",
        lambda b: ["organism", "build", "--out", b.write("a-file", "x")],
        "exists and is not a folder",
    ),
}
if not torch.cuda.is_available():
    CASES["no-gpu"] = Case(
        OPTIONS,
        "`--device cuda` on a machine without a GPU",
        lambda b: ["extract", *b.model, "--out", b.path("e"), "--device", "cuda"],
        "no CUDA GPU is visible; use --device cpu",
        also="test_run_folder.py::test_a_missing_gpu_leaves_no_folder",
    )


FAULTS: dict[str, Fault] = {
    "sigint": Fault(
        MACHINE,
        "Ctrl-C (SIGINT) during a run",
        "`refdir run` in a child process, SIGINT once `candidates.safetensors` is written",
        130,
        None,
        "test_faults.py::test_a_signalled_run_resumes_to_the_bytes_of_an_uninterrupted_one",
        "stops through its `finally` blocks, no temporary file left; a resume gives the same bytes",
    ),
    "sigterm": Fault(
        MACHINE,
        "SIGTERM during a run",
        "`refdir run` in a child process, SIGTERM once `selection.json` is written",
        143,
        None,
        "test_faults.py::test_a_signalled_run_resumes_to_the_bytes_of_an_uninterrupted_one",
        "stops through its `finally` blocks, no temporary file left; a resume gives the same bytes",
    ),
    "sigkill": Fault(
        MACHINE,
        "SIGKILL during a run",
        "`refdir run` in a child process, SIGKILL once a completions file is written",
        -9,
        None,
        "test_faults.py::test_a_signalled_run_resumes_to_the_bytes_of_an_uninterrupted_one",
        "no file half-written; a resume removes the dead process's temporaries and gives the "
        "same bytes",
    ),
    "sigterm-in-write": Fault(
        MACHINE,
        "SIGTERM while a file and a folder are being written",
        "a command in a child process, SIGTERM mid-write",
        143,
        None,
        "test_faults.py::test_a_signal_during_a_write_exits_cleanly_and_removes_the_temporaries",
        "the temporary file and folder are removed",
    ),
    "signal-in-serializer": Fault(
        MACHINE,
        "SIGTERM or Ctrl-C while pydantic runs a serializer (which wraps the signal's exception)",
        "a command in a child process, the signal inside the serializer",
        143,
        None,
        "test_faults.py::test_a_signal_inside_a_serializer_exits_cleanly",
        "exits 143 (130 for Ctrl-C) without a traceback; the temporary file is removed",
    ),
    "signal-in-reader": Fault(
        MACHINE,
        "SIGTERM or Ctrl-C while a file is read, turned by native code into the reader's error",
        "a command in a child process, the signal inside a reader",
        143,
        None,
        "test_faults.py::test_a_signal_a_reader_reports_as_damage_still_exits_as_the_signal",
        "exits 143 (130 for Ctrl-C) without claiming the file is damaged",
    ),
    "signal-at-temporary-birth": Fault(
        MACHINE,
        "SIGTERM or Ctrl-C just after a temporary file or folder is made, before it is recorded",
        "a command in a child process, the signal right after mkstemp/mkdtemp",
        143,
        None,
        "test_faults.py::test_a_signal_as_a_temporary_is_born_leaves_nothing",
        "the signal waits until the temporary is recorded; exits 143 (130), nothing is left",
    ),
    "killed-export": Fault(
        MACHINE,
        "an export killed (SIGKILL) with its temporary folder on disk",
        "a child writing an export, SIGKILL, then another export to the same folder",
        0,
        None,
        "test_faults.py::test_the_temporary_folder_of_a_killed_export_goes_with_the_next_export",
        "the next write there removes the dead process's temporary folder (a live one's stays)",
    ),
    "dead-mid-swap": Fault(
        MACHINE,
        "a process dead between the two renames that replace a folder",
        "a child that exits between the renames",
        0,
        None,
        "test_faults.py::test_a_process_dead_mid_swap_leaves_the_old_folder_to_be_put_back",
        "the next write there puts the old folder back first",
    ),
    "fsize-extract": Fault(
        MACHINE,
        "a file-size limit (`ulimit -f`) below the candidates' size",
        "`refdir extract` in a child process under RLIMIT_FSIZE 4000",
        2,
        "error: <tmp>/extract/candidates.safetensors (about 9.5 kB) would exceed the file-size "
        "limit of this process (4.0 kB, `ulimit -f`); raise the limit (`ulimit -f unlimited`) "
        "and run again",
        "test_faults.py::test_a_file_size_limit_is_one_line_before_the_work_and_leaves_nothing",
        "refused before the passes; no folder left",
    ),
    "fsize-run": Fault(
        MACHINE,
        "a file-size limit below what a run will write",
        "`refdir run` in a child process under RLIMIT_FSIZE 4000",
        2,
        "error: <tmp>/run/report.html (about 2.0 MB) would exceed the file-size limit of this "
        "process (4.0 kB, `ulimit -f`); raise the limit (`ulimit -f unlimited`) and run again",
        "test_faults.py::test_a_file_size_limit_is_one_line_before_the_work_and_leaves_nothing",
        "refused before any step (the run's largest file, its report, bounded at 2 MB); no "
        "folder left",
    ),
    "fsize-orthogonalize": Fault(
        MACHINE,
        "a file-size limit below the exported model's size",
        "`refdir orthogonalize` in a child process under RLIMIT_FSIZE 4000",
        2,
        "error: <tmp>/orthogonalized/model.safetensors (about 193.7 kB) would exceed the "
        "file-size limit of this process (4.0 kB, `ulimit -f`); raise the limit (`ulimit -f "
        "unlimited`) and run again",
        "test_faults.py::test_a_file_size_limit_is_one_line_before_the_work_and_leaves_nothing",
        "refused before the edit; no folder left",
    ),
    "fsize-evaluate": Fault(
        MACHINE,
        "a file-size limit below the completions' size",
        "`refdir evaluate --completions` in a child process under RLIMIT_FSIZE 4000",
        2,
        "error: <tmp>/evaluated/c.jsonl (about 4.2 kB) would exceed the file-size limit of this "
        "process (4.0 kB, `ulimit -f`); raise the limit (`ulimit -f unlimited`) and run again",
        "test_faults.py::test_a_file_size_limit_is_one_line_before_the_work_and_leaves_nothing",
        "refused before the model loads, not after the generation",
    ),
    "fsize-write": Fault(
        MACHINE,
        "a file-size limit met while writing (no estimate warned)",
        "writes through Python, safetensors' Rust writer and `save_pretrained` under 50 kB",
        2,
        "error: <tmp>/notes.txt would exceed the file-size limit of this process (50.0 kB, "
        "`ulimit -f`); raise the limit (`ulimit -f unlimited`) and run again",
        "test_faults.py::test_a_file_size_limit_met_while_writing_is_one_line",
        "the same line for each writer; nothing left",
    ),
    "full-disk": Fault(
        MACHINE,
        "a full disk",
        "`refdir extract` onto a 32 kB tmpfs (a user namespace)",
        2,
        "error: no space left to write <tmp>/small/extract/candidates.safetensors: it needs "
        "about 75.2 kB, 32.8 kB is free there; free space or give another folder",
        "test_faults.py::test_a_full_disk_is_one_line_before_and_while_writing",
        "refused before the passes; a write that meets a full disk says the same; nothing left",
    ),
    "two-runs": Fault(
        MACHINE,
        "two `refdir run` processes on one folder",
        "the first stopped (SIGSTOP) inside its lock while the second starts",
        2,
        "error: <tmp>/run is in use by another refdir run; wait for it to end, or give "
        "another --out folder",
        "test_faults.py::test_two_runs_on_one_folder_one_is_refused",
        "the second is refused and touches nothing; the first ends well",
    ),
    "not-finite": Fault(
        OUTPUT,
        "a number that is not finite (NaN, infinity) in a file refdir writes",
        "a record written with NaN in a number field",
        2,
        None,
        "test_artifacts.py::test_a_record_that_would_not_read_back_is_not_written",
        "a one-line error naming the field and its value; the file is not written (JSON would "
        "hold null there, which reading refuses)",
    ),
    "csv-formula": Fault(
        OUTPUT,
        "a run label that a spreadsheet would run as a formula (`=cmd|...`)",
        "`refdir compare` with such a label",
        0,
        None,
        "test_compare.py::test_labels_that_a_spreadsheet_would_run_stay_text_in_the_csv",
        "`comparison.csv` writes the cell behind a `'`; lines end in CRLF, so a cell holding a "
        "carriage return is quoted",
    ),
    "terminal-escapes": Fault(
        OUTPUT,
        "terminal escape sequences in a prompt or a completion",
        "`refdir ablate`, `add`, `evaluate` printing them",
        0,
        None,
        "test_cli.py::test_control_characters_in_prompts_and_completions_are_printed_as_escapes",
        "control characters are printed as escapes (`\\x1b`), never sent to the terminal",
    ),
    "html-escape": Fault(
        OUTPUT,
        "HTML in a prompt or completion shown in a report",
        "`refdir run`'s report",
        0,
        None,
        "test_report.py::test_completions_are_truncated_and_escaped",
        "escaped; completions truncated by default",
    ),
}


# --------------------------------------------------------------------------- running


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder below ``folder`` (a file with its bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def normalise(text: str, bench: Bench) -> str:
    """``text`` with the bench's paths written as ``<tmp>``, ``<model>``, ``<direction>`` and
    ``<bench>``."""
    for path, name in (
        (bench.tmp, "<tmp>"),
        (bench.root / "model", "<model>"),
        (bench.root / "direction", "<direction>"),
        (bench.root, "<bench>"),
    ):
        text = text.replace(str(path), name)
    return text


def run_case(case: Case, bench: Bench) -> Outcome:
    """Set the case up, run its command, and say what it did."""
    held = case.setup(bench) if case.setup is not None else None
    with held if isinstance(held, AbstractContextManager) else nullcontext():
        argv = case.argv(bench)  # may write the files it names
        before = _snapshot(bench.tmp)
        result = CliRunner().invoke(app, argv)
        after = _snapshot(bench.tmp)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    stderr = result.stderr
    errors = [normalise(line, bench) for line in stderr.splitlines() if line.startswith("error:")]
    traceback = "Traceback" in stderr or (
        result.exception is not None and not isinstance(result.exception, SystemExit)
    )
    return Outcome(result.exit_code, errors, traceback, changed)


def command_text(case: Case, bench: Bench) -> str:
    """The case's command as the table shows it."""
    held = case.setup(bench) if case.setup is not None else None
    with held if isinstance(held, AbstractContextManager) else nullcontext():
        words = case.argv(bench)
    shown = []
    for word in words:
        word = normalise(word, bench)
        shown.append(word if word and " " not in word and "\n" not in word else json.dumps(word))
    return "refdir " + " ".join(shown)


# --------------------------------------------------------------------------- the table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """``text`` as a code span (a double-backtick one when it holds a backtick)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def table(lines: dict[str, str], commands: dict[str, str]) -> str:
    """docs/reliability.md: ``lines`` (case -> its error line, as run) and ``commands``."""
    out = [
        "# Reliability",
        "",
        "What refdir does with each fault and bad input it knows of. Every command-line case",
        "below runs in `tests/test_reliability.py`, which checks the exit code, that exactly",
        "this one line is printed on stderr (no traceback), and that the command left its",
        "folder as it found it (no half-written file, no output folder of a failed command).",
        "The faults of the machine run for real in child processes (`tests/test_faults.py`):",
        "signals, a file-size limit (`RLIMIT_FSIZE`), a full tmpfs, two runs at once; the line",
        "shown is the one that test checks. Exit codes: 0 done, 2 refused or failed with the",
        "line shown, 130 Ctrl-C, 143 SIGTERM, -9 killed (SIGKILL: no handler runs).",
        "",
        "Paths are shown as `<model>` (a tiny model folder), `<direction>` (a direction",
        "extracted from it), `<bench>` (the other files the cases share) and `<tmp>` (the case's",
        "own folder). Regenerate the table with `python tests/reliability.py`.",
        "",
    ]
    groups: dict[str, list[tuple[str, Case | Fault]]] = {}
    items: list[tuple[str, Case | Fault]] = [*CASES.items(), *FAULTS.items()]
    for key, item in items:
        groups.setdefault(item.group, []).append((key, item))
    n = 0
    for group in (OPTIONS, MODELS, DIRECTIONS, PROMPTS, FOLDERS, FILES, MACHINE, OUTPUT):
        out += [
            f"## {group}",
            "",
            "| # | fault or bad input | command | exit | refdir prints | checked by |",
        ]
        out += ["|---|---|---|---|---|---|"]
        for key, item in groups.get(group, []):
            n += 1
            if isinstance(item, Case):
                checked = f"`test_reliability.py::test_case[{key}]`"
                if item.also:
                    checked += f", `{item.also}`"
                row = [str(n), item.fault, _code(commands[key]), str(item.code)]
                row += [_code(lines[key]), checked]
            else:
                said = _code(item.line) if item.line else "(no error line)"
                if item.does:
                    said += f"; {item.does}" if item.line else f" {item.does}"
                row = [str(n), item.fault, item.how, str(item.code), said, f"`{item.test}`"]
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
        out.append("")
    return "\n".join(out)


def documented() -> dict[str, tuple[int, str]]:
    """The table's rows as written: key (from its test id) -> (exit code, the cell of what
    refdir prints, without its backticks)."""
    found: dict[str, tuple[int, str]] = {}
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| # ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        key = (
            cells[5].split("test_case[", 1)[1].split("]", 1)[0]
            if "test_case[" in cells[5]
            else None
        )
        if key is not None:
            said = cells[4].replace("\\|", "|")
            said = said[3:-3] if said.startswith("`` ") else said[1:-1]
            found[key] = (int(cells[3]), said)
    return found


def main() -> None:
    import logging
    import tempfile

    # as under pytest: the root logger has a handler, so the command line's basicConfig adds
    # none bound to the first case's captured stderr (closed by the next case)
    logging.getLogger().addHandler(logging.NullHandler())

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "bench"
        root.mkdir()
        build_bench(root)
        lines, commands, wrong = {}, {}, []
        for key, case in CASES.items():
            tmp = Path(folder) / "cases" / key
            tmp.mkdir(parents=True)
            bench = Bench(root, tmp)
            outcome = run_case(case, bench)
            if outcome.code != case.code or len(outcome.errors) != 1 or outcome.traceback:
                wrong.append(f"{key}: {outcome}")
                continue
            if case.expect not in outcome.errors[0] or outcome.changed:
                wrong.append(f"{key}: {outcome} (expected {case.expect!r})")
            lines[key] = outcome.errors[0]
            tmp2 = Path(folder) / "shown" / key
            tmp2.mkdir(parents=True)
            commands[key] = command_text(case, Bench(root, tmp2)).replace(str(tmp2), "<tmp>")
            print(f"{key}: {lines[key]}", file=sys.stderr)
    if wrong:
        raise SystemExit("cases that do not do what they say:\n" + "\n".join(wrong))
    TABLE.write_text(table(lines, commands) + "\n")
    print(f"wrote {TABLE}", file=sys.stderr)


if __name__ == "__main__":
    main()
