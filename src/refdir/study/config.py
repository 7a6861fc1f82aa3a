"""The options of a `refdir run` (:class:`RunConfig`), kept apart from the pipeline so that
the command line can check them without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from refdir.errors import RefdirError
from refdir.layout_spec import LayoutSpec

if TYPE_CHECKING:
    from refdir.select import SelectionConfig

__all__ = ["STEPS", "RunConfig", "check_step", "recorded_options"]


STEPS = ("prompts", "extract", "select", "evaluate", "benchmarks", "suffix", "report")
"""The steps of ``refdir run``, in order."""


def check_step(step: str | None, option: str) -> None:
    """A one-line error unless ``step`` (the value of ``option``) is None or a step's name."""
    if step is not None and step not in STEPS:
        raise RefdirError(f"unknown step {step!r} for {option}; use one of {', '.join(STEPS)}")


class RunConfig(BaseModel):
    """Every option of a run; the defaults are the paper's where it gives one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("organism", description="organism, a local folder, a .gguf file or a hub id")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16")
    gguf_file: str | None = Field(None, description="GGUF file name inside the model folder")
    trust_remote_code: bool = Field(
        False, description="allow code from the model repository (off unless asked)"
    )
    system: str | None = Field(
        None, description="system prompt for the chat template (None: the template's default)"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template (its text), for models without one"
    )
    layout: dict[str, str | None] | None = Field(
        None,
        description="layout pattern overrides (LayoutSpec fields) for a model whose parts the "
        "defaults miss",
    )
    seed: int = Field(42, description="seed for every sample of prompts")
    n_train: int = Field(
        128, ge=1, description="harmful and harmless prompts for the difference of means"
    )
    n_val: int = Field(32, ge=1, description="harmful and harmless prompts for selection")
    harmful_train: str = Field("harmful_train", description="harmful set for extraction")
    harmless_train: str = Field("harmless_train", description="harmless set for extraction")
    harmful_val: str = Field("harmful_val", description="harmful set for selection (bypass)")
    harmless_val: str = Field("harmless_val", description="harmless set for selection (induce, KL)")
    harmful_eval: tuple[str, ...] = Field(
        ("harmful_test", "jailbreakbench"), description="held-out harmful sets"
    )
    harmless_eval: str = Field("harmless_test", description="held-out harmless set")
    n_eval_harmful: int | None = Field(
        100, ge=1, description="prompts per harmful eval set, the paper's n_test (None: all)"
    )
    n_eval_harmless: int = Field(100, ge=1, description="held-out harmless prompts")
    max_new_tokens: int = Field(64, ge=1, description="greedy tokens per completion")
    batch_size: int = Field(
        32, ge=1, description="prompts per forward pass (batched by length, so little padding)"
    )
    gen_batch_size: int = Field(
        256,
        ge=1,
        description="prompts generated together: each decoding step reads the weights once for "
        "all of them, so larger is faster where memory allows",
    )
    refusal_tokens: tuple[int, ...] | None = Field(
        None,
        description="token ids that start a refusal; derived from the model's own refusals if None",
    )
    n_refusal_probe: int = Field(
        32, description="harmful_train prompts generated to find the refusal tokens"
    )
    filter_prompts: bool = Field(
        True, description="keep harmful prompts with refusal metric > 0 and harmless ones < 0"
    )
    kl_max: float = Field(
        0.1, allow_inf_nan=False, description="selection: discard candidates with KL above this"
    )
    induce_min: float = Field(
        0.0, allow_inf_nan=False, description="selection: discard candidates with induce below this"
    )
    max_layer_fraction: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="selection: discard layers >= this fraction of depth",
    )
    fallback_kl_bounds: tuple[float, ...] = Field(
        (0.25, 0.5, 1.0), description="KL bounds tried when nothing passes"
    )
    score_all: bool = Field(
        False,
        description="score every candidate on every measure, also those the filters discard "
        "(full heatmaps; slower)",
    )
    layer: int | None = Field(
        None, description="use this layer instead of selecting (with position)"
    )
    position: int | None = Field(
        None, description="use this position instead of selecting (with layer)"
    )
    harmful_coeff: float = Field(
        -1.0,
        allow_inf_nan=False,
        description="activation addition on harmful prompts (negative: subtract)",
    )
    harmless_coeff: float = Field(
        1.0, allow_inf_nan=False, description="activation addition on harmless prompts"
    )
    ce_corpus: str = Field("prose", description="packaged text corpus for the CE loss")
    n_ce: int = Field(64, ge=1, description="texts of the corpus used for the CE loss")
    n_random_kl: int = Field(
        0,
        ge=0,
        description="also ablate this many random directions on the harmless eval prompts, as "
        "a reference for the chosen direction's KL (0: skip; each costs a pass over the prompts)",
    )
    judge: str | None = Field(None, description="safety judge name (llamaguard, harmbench)")
    judge_model: str | None = Field(None, description="local path of the judge model")
    benchmarks: tuple[str, ...] = Field(
        (),
        description="lm-evaluation-harness tasks (YAML files, or names found in benchmark_path) "
        "scored without and with the direction ablated (step 'benchmarks'; none: skipped)",
    )
    benchmark_path: tuple[str, ...] = Field(
        (), description="folders searched for the benchmark tasks named by name"
    )
    benchmark_limit: int | None = Field(
        None, ge=1, description="at most this many items per benchmark task (None: all)"
    )
    truncate: int = Field(200, description="characters of each completion shown in the report")
    suffix: bool = Field(
        False, description="also search an adversarial suffix and analyse it (step 'suffix')"
    )
    n_suffix_prompts: int = Field(
        8, description="refused harmful_train prompts the suffix is optimised on"
    )
    n_suffix_eval: int = Field(32, description="held-out harmful prompts for the suffix analysis")
    suffix_steps: int = Field(20, ge=0, description="GCG steps of the suffix search")
    suffix_max_minutes: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="stop the suffix search after this many minutes (0: no limit)",
    )

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: dict[str, str | None] | None) -> dict[str, str | None] | None:
        if value is not None:
            try:
                LayoutSpec.from_fields(value)
            except RefdirError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _pick_by_hand(self) -> RunConfig:
        if (self.layer is None) != (self.position is None):
            raise ValueError("give both --layer and --position to choose the direction by hand")
        if self.position is not None and self.position >= 0:
            raise ValueError("--position counts back from the last token: -1, -2, ...")
        if self.layer is not None and self.layer < 0:
            raise ValueError("--layer must be 0 or more")
        return self

    def selection(self) -> SelectionConfig:
        from refdir.select import SelectionConfig

        return SelectionConfig(
            self.kl_max, self.induce_min, self.max_layer_fraction, self.fallback_kl_bounds
        )

    def result_keys(self) -> dict[str, Any]:
        """The options that change results (device and display options excluded)."""
        return self.model_dump(
            mode="json",
            exclude={
                "device",
                "dtype",
                "trust_remote_code",
                "batch_size",
                "gen_batch_size",
                "truncate",
            },
        )


def recorded_options(recorded: dict[str, Any]) -> dict[str, Any]:
    """The options a run's config.json records, each option newer than the record at its
    default (the run resumes with those)."""
    return {**RunConfig().result_keys(), **recorded}
