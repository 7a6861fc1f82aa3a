"""The smaller files of a ``refdir run`` folder: the run's options (``config.json``), the prompts
sampled (``prompts.json``), the refusal tokens (``refusal_tokens.json``), the completions
(``completions/*.jsonl``), the benchmarks (``benchmarks.json``), the wall time of the steps
(``timings.json``), and the files that are not JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator

from refdir.artifacts.base import Artifact, RunFile, Strict, read_json_object
from refdir.data.prompts import prompt_problem
from refdir.errors import RefdirError

__all__ = [
    "CANDIDATES",
    "DIRECTION_TENSOR",
    "REPORT_HTML",
    "REPORT_MD",
    "BenchmarksRecord",
    "Completion",
    "ConfigRecord",
    "Numerics",
    "PromptSets",
    "RefusalTokensRecord",
    "RunMarker",
    "TimingsRecord",
]

log = logging.getLogger(__name__)

CANDIDATES = RunFile("candidates.safetensors", "extract")
DIRECTION_TENSOR = RunFile("direction.safetensors", "select")
REPORT_HTML = RunFile("report.html", "report")
REPORT_MD = RunFile("report.md", "report")


class Numerics(Strict):
    """Where and in what precision a run computes: changing either changes its numbers."""

    device: str = Field(description="cpu, cuda, or auto (several GPUs through device_map)")
    dtype: str = Field(description="the model's parameters: float32, bfloat16 or float16")


class ConfigRecord(Artifact):
    """The run's options, written when a run starts and checked when it resumes."""

    FILE: ClassVar[str] = "config.json"
    OMIT: ClassVar[frozenset[str]] = frozenset({"numerics"})

    options: dict[str, Any] = Field(
        description="the options that change results (RunConfig, without device, dtype and "
        "speed options)"
    )
    run: dict[str, Any] = Field(description="every option of the run (RunConfig)")
    local_model: bool = Field(description="whether `model` named a local path where the run ran")
    versions: dict[str, str] = Field(
        description="python, torch, transformers, refdir, peft, safetensors"
    )
    numerics: Numerics | None = Field(
        None,
        description="where and in what precision the run computes (none in a folder of 0.1.0)",
    )

    @classmethod
    def fix(cls, folder: Path) -> str:
        return "redo the run with `force='prompts'` (or use a new `out` folder)"


class RunMarker(Artifact):
    """The file that makes a folder a ``refdir run`` folder: a run takes no other folder but a
    new or empty one, or one with this file."""

    FILE: ClassVar[str] = "refdir-run.json"

    refdir_run: Literal[1] = Field(1, description="the run folder's format")
    created_by: str = Field(description="the refdir version that made the folder")


class PromptSets(Artifact):
    """The prompt sets as sampled (seeded); each later step filters the ones it uses."""

    FILE: ClassVar[str] = "prompts.json"
    STEP: ClassVar[str | None] = "prompts"

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]

    @field_validator("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    @classmethod
    def _prompts(cls, prompts: list[str]) -> list[str]:
        """Prompts no model can take (empty, whitespace, a lone surrogate) are refused here,
        not by a tokenizer steps later."""
        for index, text in enumerate(prompts):
            problem = prompt_problem(text)
            if problem is not None:
                raise ValueError(f"prompt {index} is {problem}")
        return prompts


class RefusalTokensRecord(Artifact):
    """The token ids that start the model's refusals (and their text)."""

    FILE: ClassVar[str] = "refusal_tokens.json"
    STEP: ClassVar[str | None] = "prompts"
    OMIT: ClassVar[frozenset[str]] = frozenset({"coverage", "n_refusals", "n_prompts"})

    ids: list[int] = Field(min_length=1)
    coverage: float | None = Field(
        None, description="share of the probed refusals these tokens start"
    )
    n_refusals: int | None = Field(None, description="refusals among the probed completions")
    n_prompts: int | None = Field(None, description="harmful prompts probed")
    source: str = Field(description="where the ids come from")
    texts: list[str] = Field(description="each id decoded")


class Completion(Strict):
    """One line of ``completions/{set}.{condition}.jsonl``."""

    prompt: str
    completion: str
    refusal: bool = Field(
        description="refusal by markers (a reasoning model's: in the answer after its think block)"
    )
    answered: bool = Field(
        True, description="false: cut off inside a reasoning model's think block, no answer"
    )
    reasoning_refusal: bool | None = Field(
        None, description="the think block holds a refusal marker (null: no think block)"
    )


class BenchmarksRecord(Artifact):
    """lm-evaluation-harness scores of the model as it is and with the direction ablated."""

    FILE: ClassVar[str] = "benchmarks.json"
    STEP: ClassVar[str | None] = "benchmarks"

    tasks: list[str]
    limit: int | None = Field(description="at most this many items per task")
    scores: dict[str, dict[str, dict[str, float]]] = Field(
        description="{task: {metric: {condition: value}}}"
    )


class TimingsRecord(Artifact):
    """Wall time of each step run so far, of the timed parts of some steps, and the device
    each step ran the model on. Informational: a damaged entry is dropped when read."""

    FILE: ClassVar[str] = "timings.json"
    OMIT: ClassVar[frozenset[str]] = frozenset(
        {"prompts", "extract", "select", "evaluate", "benchmarks", "suffix", "monitor", "report"}
    )

    prompts: float | None = None
    extract: float | None = None
    select: float | None = None
    evaluate: float | None = None
    benchmarks: float | None = None
    suffix: float | None = None
    monitor: float | None = None
    report: float | None = None
    parts: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="{step: {part: seconds}}"
    )
    devices: dict[str, str] = Field(default_factory=dict, description="{step: device}")

    def steps(self) -> dict[str, float]:
        """The seconds of every step recorded, in the order the steps run."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, float)}

    @classmethod
    def read_lenient(cls, folder: Path) -> TimingsRecord:
        """The file in ``folder`` (empty when there is none); damaged entries are dropped with a
        warning, the others kept."""
        path = folder / cls.FILE
        if not path.exists():
            return cls()
        try:
            data = read_json_object(path, "its entries are dropped")
        except RefdirError:
            log.warning("%s is damaged; the earlier steps' times are lost", path)
            return cls()
        lost = False
        for _ in range(len(data) + 1):
            try:
                record = cls.model_validate(data)
            except ValidationError as exc:
                lost = True
                top = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                for key in top:
                    entry = data.get(key)
                    if isinstance(entry, dict) and key in ("parts", "devices"):
                        bad = {
                            str(e["loc"][1])
                            for e in exc.errors()
                            if len(e["loc"]) > 1 and e["loc"][0] == key
                        }
                        data[key] = {k: v for k, v in entry.items() if k not in bad}
                    else:
                        data.pop(key, None)
                continue
            if lost:
                log.warning("%s has damaged entries; their times are lost", path)
            return record
        return cls()
