"""Which model to load and how (:class:`ModelOptions`): the options every command that loads
a model shares, declared once. Free of torch, so that the command line can check them before
anything heavy is imported."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refdir.errors import RefdirError
from refdir.flags import Flag
from refdir.model.layout_spec import LayoutSpec

__all__ = ["DTYPES", "ModelOptions", "TemplateValue", "template_option"]

_PANEL = "Model"

DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
"""The dtype names ``dtype`` takes besides ``auto``, each with torch's name for it."""

TemplateValue = bool | int | float | str
"""A chat template option's value."""

_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


class ModelOptions(BaseModel):
    """A model to load: where it is, where it runs, and its chat format and layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Flag(short="-m", panel=_PANEL)] = Field(
        "organism",
        description="organism (the bundled default), a local folder, a .gguf file or a hub id",
    )
    device: Annotated[str, Flag(panel=_PANEL)] = Field(
        "cpu", description="cpu, cuda, cuda:N, or auto (device_map over every visible GPU)"
    )
    dtype: Annotated[str, Flag(panel=_PANEL)] = Field(
        "auto",
        description="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16",
    )
    gguf_file: Annotated[str | None, Flag(panel=_PANEL)] = Field(
        None, description="a GGUF file's name inside the model folder"
    )
    trust_remote_code: Annotated[bool, Flag(panel=_PANEL)] = Field(
        False, description="run code from the model repository (off unless asked)"
    )
    system: Annotated[str | None, Flag(panel=_PANEL)] = Field(
        None, description="system prompt for the chat template (none: the template's own default)"
    )
    chat_template: Annotated[str | None, Flag(panel=_PANEL, from_file="text")] = Field(
        None,
        description="a Jinja chat template, for a model without one or to replace its own",
    )
    template_kwargs: Annotated[
        dict[str, TemplateValue] | None, Flag(name="template-kwarg", items=True, panel=_PANEL)
    ] = Field(
        None,
        description="options for the chat template, as KEY=VALUE items (true, false and numbers "
        "as such), e.g. enable_thinking=false",
    )
    layout: Annotated[dict[str, str | None] | None, Flag(panel=_PANEL, from_file="json")] = Field(
        None,
        description='layout patterns (LayoutSpec fields, e.g. {"mlp": "feed_forward", '
        '"mlp_out": "w2"}) for a model whose parts refdir does not find by name',
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value != "auto" and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of auto, {', '.join(DTYPES)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N or auto")
        return value

    @field_validator("template_kwargs", mode="before")
    @classmethod
    def _template_kwargs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(item for item in value.split(",") if item.strip())
        if isinstance(value, (tuple, list)):  # KEY=VALUE items, as the command line gives them
            return dict(template_option(item) for item in value)
        return value

    @field_validator("layout", mode="before")
    @classmethod
    def _layout(cls, value: Any) -> Any:
        if isinstance(value, str):  # a JSON object, as TOML (which has no null) carries it
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object of LayoutSpec fields ({exc})") from None
        if isinstance(value, dict):
            try:
                LayoutSpec.from_fields(value)
            except RefdirError as exc:
                raise ValueError(str(exc)) from None
        return value

    def template_options(self) -> dict[str, TemplateValue]:
        """The chat template's options (none: an empty dict)."""
        return dict(self.template_kwargs or {})

    def layout_spec(self) -> LayoutSpec | None:
        """The layout overrides as a :class:`LayoutSpec` (None: the defaults)."""
        return LayoutSpec.from_fields(self.layout) if self.layout else None


def template_option(item: str) -> tuple[str, TemplateValue]:
    """``KEY=VALUE`` as a chat template option: true and false as booleans, numbers as numbers,
    anything else as text."""
    key, sep, raw = str(item).partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"{item!r} is not KEY=VALUE; give e.g. enable_thinking=false")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw
