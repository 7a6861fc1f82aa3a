"""The options of a study (:class:`RunConfig`): declared once, here, with their defaults (the
paper's where it gives one) and descriptions. The command line's ``refdir run`` options are
built from these fields (:mod:`refdir.flags`); a run can also be given as a TOML file of them
(:func:`read_config`). Free of torch, so that the command line can check them before anything
heavy is imported."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from refdir.errors import RefdirError
from refdir.flags import Flag
from refdir.model.options import ModelOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_TOML",
    "PAPER_PROTOCOL",
    "PROTOCOLS",
    "RESULT_FREE",
    "RunConfig",
    "config_toml",
    "option_error",
    "read_config",
]

CONFIG_TOML = "config.toml"
"""The resolved options of a run, as a TOML file ``refdir run --config`` takes again."""

PROTOCOL, PROMPTS, SELECTION, EVALUATION = "Protocol", "Prompts", "Selection", "Evaluation"
BENCHMARKS, SUFFIX, SPEED = "Benchmarks", "Suffix", "Speed"

RESULT_FREE = frozenset(
    {"device", "dtype", "trust_remote_code", "batch_size", "gen_batch_size", "truncate"}
)
"""Options that cannot change results: they may differ between a run and its resumption."""

PAPER_PROTOCOL: dict[str, Any] = {
    "sampling": "one-stream",
    "family_refusal_tokens": True,
    "layer_rule": "floor",
    "epsilons": True,
    "harmful_eval": ("jailbreakbench",),
    "n_eval_harmful": None,
    "harmless_eval": "harmless_test_paper",
    "max_new_tokens": 512,
    "judge_min_words": 15,
}
"""What ``protocol="paper"`` sets, wherever an option is not given: the paper's code
(andyrdt/refusal_direction) where its text and code differ, and its evaluation. Its other
settings (128 + 32 prompts, seed 42, the filters, the coefficients) are refdir's defaults."""

PROTOCOLS: dict[str, dict[str, Any]] = {"refdir": {}, "paper": PAPER_PROTOCOL}
"""The protocols, each with the options it sets (refdir's own: none, the defaults)."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": tuple(PROTOCOLS),
    "sampling": ("per-set", "one-stream"),
    "layer_rule": ("fraction", "floor"),
}


class RunConfig(ModelOptions):
    """Every option of a run (the model's, then the study's)."""

    protocol: Annotated[str, Flag(panel=PROTOCOL)] = Field(
        "refdir",
        description="refdir (its own defaults) or paper: the paper's code wherever its text and "
        "code differ, and its evaluation (JailbreakBench, 512 tokens, the 15-word rule); an "
        "option given explicitly still wins",
    )
    sampling: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "per-set",
        description="per-set: each prompt set sampled with its own seeded generator; "
        "one-stream: the training, validation and harmless evaluation sets drawn in turn from "
        "one seeded stream, in the paper's order",
    )
    family_refusal_tokens: Annotated[bool, Flag(panel=PROMPTS)] = Field(
        False,
        description="use the refusal token ids the paper's code fixes for the model's family "
        "(Gemma, Llama-2, Llama-3, Qwen, Yi) when the tokenizer matches; others are derived",
    )
    seed: Annotated[int, Flag(panel=PROMPTS)] = Field(
        42, description="seed for every sample of prompts"
    )
    n_train: Annotated[int, Flag(panel=PROMPTS)] = Field(
        128, ge=1, description="harmful and harmless prompts for the difference of means"
    )
    n_val: Annotated[int, Flag(panel=PROMPTS)] = Field(
        32, ge=1, description="harmful and harmless prompts for selection"
    )
    harmful_train: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "harmful_train", description="harmful set for extraction (a packaged set or a file)"
    )
    harmless_train: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "harmless_train", description="harmless set for extraction"
    )
    harmful_val: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "harmful_val", description="harmful set for selection (bypass)"
    )
    harmless_val: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "harmless_val", description="harmless set for selection (induce, KL)"
    )
    harmful_eval: Annotated[tuple[str, ...], Flag(panel=PROMPTS, items=True)] = Field(
        ("harmful_test", "jailbreakbench"), description="held-out harmful sets"
    )
    harmless_eval: Annotated[str, Flag(panel=PROMPTS)] = Field(
        "harmless_test", description="held-out harmless set"
    )
    n_eval_harmful: Annotated[int | None, Flag(panel=PROMPTS, zero_is_none=True)] = Field(
        100,
        ge=1,
        description="prompts per held-out harmful set, the paper's n_test (seeded sample; "
        "none, or 0 on the command line: all of them)",
    )
    n_eval_harmless: Annotated[int, Flag(panel=PROMPTS)] = Field(
        100, ge=1, description="held-out harmless prompts"
    )
    refusal_tokens: Annotated[tuple[int, ...] | None, Flag(panel=PROMPTS, items=True)] = Field(
        None,
        description="token ids that start a refusal (none: derived from the model's own refusals)",
    )
    n_refusal_probe: Annotated[int, Flag(panel=PROMPTS)] = Field(
        32, ge=1, description="harmful_train prompts generated to find the refusal tokens"
    )
    filter_prompts: Annotated[bool, Flag(name="filter", panel=PROMPTS)] = Field(
        True,
        description="keep only prompts the model refuses (harmful) or answers (harmless), by "
        "the refusal metric",
    )
    kl_max: Annotated[float, Flag(panel=SELECTION)] = Field(
        0.1, allow_inf_nan=False, description="discard candidates with KL above this"
    )
    induce_min: Annotated[float, Flag(panel=SELECTION)] = Field(
        0.0, allow_inf_nan=False, description="discard candidates with induce below this"
    )
    max_layer_fraction: Annotated[float, Flag(panel=SELECTION)] = Field(
        0.8,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="discard layers >= this fraction of the depth",
    )
    layer_rule: Annotated[str, Flag(panel=SELECTION)] = Field(
        "fraction",
        description="the layer filter: fraction keeps layer < max_layer_fraction x L (the "
        "paper's text), floor keeps layer < int(max_layer_fraction x L) (the paper's code)",
    )
    epsilons: Annotated[bool, Flag(panel=SELECTION)] = Field(
        False,
        description="score with the paper's code's epsilons: log(p + 1e-8) - log(1 - p + 1e-8) "
        "and KL with 1e-6 inside both logs (bounded; exact forms without)",
    )
    fallback_kl_bounds: Annotated[
        tuple[float, ...], Flag(name="fallback-kl", panel=SELECTION, items=True, empty="none")
    ] = Field(
        (0.25, 0.5, 1.0),
        description="KL bounds tried in order when no candidate passes (none: no fallback, "
        "fail instead)",
    )
    score_all: Annotated[bool, Flag(panel=SELECTION)] = Field(
        False,
        description="score every candidate on every measure, also those the filters discard "
        "(full heatmaps; slower)",
    )
    layer: Annotated[int | None, Flag(panel=SELECTION)] = Field(
        None, description="choose the direction by hand: this layer (with position)"
    )
    position: Annotated[int | None, Flag(panel=SELECTION)] = Field(
        None, description="choose the direction by hand: this position (with layer)"
    )
    harmful_coeff: Annotated[float, Flag(panel=EVALUATION)] = Field(
        -1.0,
        allow_inf_nan=False,
        description="activation addition on harmful prompts (negative: subtract)",
    )
    harmless_coeff: Annotated[float, Flag(panel=EVALUATION)] = Field(
        1.0, allow_inf_nan=False, description="activation addition on harmless prompts"
    )
    max_new_tokens: Annotated[int, Flag(panel=EVALUATION)] = Field(
        64, ge=1, description="greedy tokens per completion"
    )
    long_tokens: Annotated[int, Flag(panel=EVALUATION)] = Field(
        256,
        ge=0,
        description="also count refusals of the harmful prompts under ablation at this longer "
        "length, where markers after a first sentence show (0, or not above max_new_tokens: "
        "skipped)",
    )
    reasoning_tokens: Annotated[int, Flag(panel=EVALUATION)] = Field(
        1024,
        ge=0,
        description="greedy tokens per completion instead of max_new_tokens when the chat "
        "template thinks (the model reasons in a think block before it answers; 0: "
        "max_new_tokens still)",
    )
    ce_corpus: Annotated[str, Flag(panel=EVALUATION)] = Field(
        "prose",
        description="corpus for the CE loss: prose (packaged), or a local JSON/JSONL file of "
        "texts (e.g. the Pile) or of Alpaca records with reference outputs",
    )
    n_ce: Annotated[int, Flag(panel=EVALUATION)] = Field(
        64, ge=1, description="texts of the corpus used for the CE loss"
    )
    n_random_kl: Annotated[int, Flag(name="random-kl", panel=EVALUATION)] = Field(
        0,
        ge=0,
        description="also ablate this many random directions on the harmless eval prompts, as "
        "a reference for the chosen direction's KL (0: skip; each costs a pass over the prompts)",
    )
    judge: Annotated[str | None, Flag(panel=EVALUATION)] = Field(
        None, description="safety judge: llamaguard or harmbench"
    )
    judge_model: Annotated[str | None, Flag(panel=EVALUATION)] = Field(
        None, description="local folder of the judge model"
    )
    judge_min_words: Annotated[int, Flag(panel=EVALUATION)] = Field(
        0,
        ge=0,
        description="the judge counts a completion of fewer words than this as safe (the "
        "paper's code: 15; 0: off)",
    )
    benchmarks: Annotated[tuple[str, ...], Flag(panel=BENCHMARKS, items=True)] = Field(
        (),
        description="lm-evaluation-harness tasks scored without and with the direction ablated: "
        "task YAML files, or names found in benchmark_path (else among lm_eval's built-in "
        "tasks, whose data must be in the local cache); none: the step is skipped",
    )
    benchmark_path: Annotated[tuple[str, ...], Flag(panel=BENCHMARKS, items=True)] = Field(
        (), description="folders searched for the benchmark tasks given by name"
    )
    benchmark_limit: Annotated[int | None, Flag(panel=BENCHMARKS)] = Field(
        None, ge=1, description="at most this many items per benchmark task (none: all)"
    )
    suffix: Annotated[bool, Flag(panel=SUFFIX)] = Field(
        False, description="also search an adversarial suffix and analyse it (step 'suffix')"
    )
    n_suffix_prompts: Annotated[int, Flag(panel=SUFFIX)] = Field(
        8, ge=1, description="refused harmful_train prompts the suffix is searched on"
    )
    n_suffix_eval: Annotated[int, Flag(panel=SUFFIX)] = Field(
        32, ge=1, description="held-out harmful prompts for the suffix analysis"
    )
    suffix_steps: Annotated[int, Flag(panel=SUFFIX)] = Field(
        20, ge=0, description="GCG steps of the suffix search"
    )
    suffix_max_minutes: Annotated[float, Flag(panel=SUFFIX)] = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="stop the suffix search after this many minutes (0: no limit)",
    )
    batch_size: Annotated[int, Flag(panel=SPEED)] = Field(
        32, ge=1, description="prompts per forward pass (batched by length, so little padding)"
    )
    gen_batch_size: Annotated[int, Flag(panel=SPEED)] = Field(
        256,
        ge=1,
        description="prompts generated together: each decoding step reads the weights once for "
        "all of them, so larger is faster where memory allows",
    )
    truncate: Annotated[int, Flag(panel="Report")] = Field(
        200, ge=1, description="characters of each completion shown in the report"
    )

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, values: Any) -> Any:
        """The protocol's options, under those given explicitly."""
        if not isinstance(values, dict):
            return values
        name = values.get("protocol", "refdir")
        preset = PROTOCOLS.get(name) if isinstance(name, str) else None
        return {**preset, **values} if preset else values

    @field_validator(*_CHOICES, mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> Any:
        choices = _CHOICES[str(info.field_name)]
        if value not in choices:
            raise ValueError(f"unknown value {value!r}; use one of {', '.join(choices)}")
        return value

    @field_validator("fallback_kl_bounds", mode="before")
    @classmethod
    def _bounds(cls, value: Any) -> Any:
        problem = ValueError("give positive numbers, e.g. 0.25,0.5 (none: no fallback)")
        if isinstance(value, str):
            raise problem
        try:
            bounds = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise problem from None
        if not all(math.isfinite(b) and b > 0 for b in bounds):
            raise problem
        return bounds

    @field_validator("refusal_tokens", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError("give integer token ids, e.g. 40,1205") from None

    @field_validator("n_eval_harmful", mode="before")
    @classmethod
    def _all_eval(cls, value: Any) -> Any:
        return None if value == 0 and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _pick_by_hand(self) -> RunConfig:
        if (self.layer is None) != (self.position is None):
            raise ValueError("give both `layer` and `position` to choose the direction by hand")
        if self.position is not None and self.position >= 0:
            raise ValueError("`position` counts back from the last token: -1, -2, ...")
        if self.layer is not None and self.layer < 0:
            raise ValueError("`layer` must be 0 or more")
        if not self.harmful_eval:
            raise ValueError("`harmful_eval` names no set; give one or more, e.g. harmful_test")
        return self

    def result_keys(self) -> dict[str, Any]:
        """The options that change results (see :data:`RESULT_FREE`)."""
        return self.model_dump(mode="json", exclude=set(RESULT_FREE))


def option_error(exc: ValidationError) -> RefdirError:
    """The first problem of a rejected config as a one-line error naming the option."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across options names its options itself
        return RefdirError(message)
    field = str(error["loc"][0])
    return RefdirError(f"`{field}`: {message[0].lower()}{message[1:]}")


def read_config(path: Path) -> dict[str, Any]:
    """The options in a TOML file (a table of :class:`RunConfig` fields); a one-line error for
    a missing or malformed file. Its values are checked where the config is made."""
    if not path.is_file():
        raise RefdirError(f"config file {path} does not exist; give a TOML file of run options")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RefdirError(f"config file {path} is not readable TOML ({exc})") from None
    unknown = sorted(set(values) - set(RunConfig.model_fields))
    if unknown:
        raise RefdirError(
            f"config file {path}: unknown option {unknown[0]!r}; the options are the fields "
            "of RunConfig"
        )
    return values


def config_toml(config: RunConfig) -> str:
    """Every option of ``config`` as TOML (the resolved config a run folder records). TOML has
    no null: an option that is None at its default is left out, one whose None means "all" is
    written as 0, and the layout (whose patterns may be null) as a JSON string."""
    values = config.model_dump(mode="json")
    text: dict[str, Any] = {}
    for name, value in values.items():
        if name == "layout" and value is not None:
            value = json.dumps(value)
        if value is None:
            if RunConfig.model_fields[name].default is None:
                continue
            value = 0  # n_eval_harmful: 0 stands for all of them
        text[name] = value
    return tomli_w.dumps(text)
