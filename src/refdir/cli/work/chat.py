"""`refdir chat`: talk to a model and switch the intervention between turns.

Each turn goes through the model's own chat template with the conversation so far, and the
answer (greedy) is written as it is generated. Commands start with ``/`` (:data:`HELP`); the
intervention chosen applies from the next answer on, to the whole conversation."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer
from transformers import TextStreamer

from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.errors import RefdirError
from refdir.interventions.intervention import NONE, Intervention
from refdir.model.chat_model import ChatModel
from refdir.model.generation import stop_ids
from refdir.model.loading import ORGANISM, load_model
from refdir.model.options import ModelOptions

__all__ = ["HELP", "ChatSession", "chat", "organism_direction"]

HELP = """commands:
  /none          answer as the model is
  /ablate        answer with the direction ablated at every layer and position
  /add [COEFF]   answer with COEFF x the direction added at its layer (default: --coeff)
  /compare [TEXT]  answer TEXT (default: your last message) once under each of none, ablate
                 and add, beside one another; the conversation is left as it was
  /reset         forget the conversation
  /help          this list
  /quit          leave (so does end of input)"""

ORGANISM_LAYER = 22
"""The layer `refdir run` selects on the organism (position -1; docs/organism.md)."""

ORGANISM_PROMPTS = 64
"""Prompts of harmful_train and of harmless_train the organism's direction is the mean
difference of, when chat is given none."""

Write = Callable[[str], None]


class _Streamer(TextStreamer):
    """transformers' text streamer (whole words as they complete), written to ``write``."""

    def __init__(self, tokenizer: Any, write: Write) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text + ("\n" if stream_end else ""))


@dataclass
class ChatSession:
    """A conversation with ``cm``: its messages, and the intervention the next answer runs
    under."""

    cm: ChatModel
    direction: Direction
    write: Write
    max_new_tokens: int = 128
    coeff: float = 1.0
    intervention: Intervention = NONE
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.intervention.describe()

    def prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """The conversation through the model's chat template, ready for its answer, within
        its context (the oldest exchanges dropped when it would not fit)."""
        cm = self.cm
        limit = cm.context
        while True:
            full = list(messages)
            if cm.system is not None:
                full.insert(0, {"role": "system", "content": cm.system})
            kwargs = dict(cm.template_kwargs)
            if cm.chat_template is not None:
                kwargs["chat_template"] = cm.chat_template
            text = cm.tokenizer.apply_chat_template(
                full, tokenize=False, add_generation_prompt=True, **kwargs
            )
            ids = cm.tokenizer(str(text), add_special_tokens=False)["input_ids"]
            if limit is None or len(ids) + self.max_new_tokens <= limit or len(messages) <= 1:
                break
            messages = messages[2:]  # the oldest question and its answer
            self.write(
                "(the conversation is longer than the model's context: its oldest "
                "exchange is left out)\n"
            )
        if limit is not None and len(ids) + self.max_new_tokens > limit:
            raise RefdirError(
                f"the message is {len(ids)} tokens with its template, more than the model's "
                f"context of {limit} less {self.max_new_tokens} for the answer; shorten it"
            )
        return torch.tensor([ids], dtype=torch.long)

    def answer(self, messages: list[dict[str, str]], intervention: Intervention) -> str:
        """The greedy answer to ``messages`` under ``intervention``, written as it comes."""
        cm = self.cm
        ids = self.prompt_ids(messages).to(cm.device)
        stops = sorted(stop_ids(cm))
        streamer = _Streamer(cm.tokenizer, self.write)
        with torch.inference_mode(), intervention.apply(cm):
            out = cm.model.generate(  # type: ignore[operator]  # transformers' stubs
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=cm.chat.pad_id,
                streamer=streamer,
            )
        new = [int(t) for t in out[0, ids.shape[1] :] if int(t) not in stops]
        return str(cm.tokenizer.decode(new, skip_special_tokens=True))

    def say(self, text: str) -> None:
        """One turn: ``text`` answered under the current intervention, both kept."""
        messages = [*self.messages, {"role": "user", "content": text}]
        reply = self.answer(messages, self.intervention)
        self.messages = [*messages, {"role": "assistant", "content": reply}]

    def compare(self, text: str | None) -> None:
        """``text`` (None: the last message, in the conversation before it) answered under each
        intervention in turn; the conversation stays as it was."""
        before = self.messages
        if text is None:
            asked = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if not asked:
                self.write("nothing to compare yet: /compare TEXT, or say something first\n")
                return
            before, text = self.messages[: asked[-1]], self.messages[asked[-1]]["content"]
        messages = [*before, {"role": "user", "content": text}]
        for intervention in (
            NONE,
            Intervention.ablation(self.direction),
            Intervention.addition(self.direction, self.coeff),
        ):
            self.write(f"--- {intervention.describe()} ---\n")
            self.answer(messages, intervention)

    def command(self, line: str) -> bool:
        """Carry out a ``/`` command; False once the chat should end."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "none":
            self.intervention = NONE
        elif name == "ablate":
            self.intervention = Intervention.ablation(self.direction)
        elif name == "add":
            coeff = self.coeff
            if rest:
                try:
                    coeff = float(rest)
                except ValueError:
                    coeff = math.nan
                if not math.isfinite(coeff):
                    self.write(f"/add takes a number, got {rest!r}\n")
                    return True
            self.coeff = coeff
            self.intervention = Intervention.addition(self.direction, coeff)
        elif name == "compare":
            self.compare(rest or None)
            return True
        elif name == "reset":
            self.messages = []
            self.write("(conversation forgotten)\n")
            return True
        elif name == "help":
            self.write(HELP + "\n")
            return True
        else:
            self.write(f"unknown command /{name}; /help lists them\n")
            return True
        self.write(f"(now: {self.label})\n")
        return True

    def run(self, lines: Iterable[str], show_prompt: Callable[[str], None]) -> None:
        """The chat loop over ``lines`` (stdin), ``show_prompt`` asking for each."""
        show_prompt(f"[{self.label}] you> ")
        for raw in lines:
            line = raw.strip()
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                elif line:
                    self.say(line)
            except RefdirError as exc:  # a message too long for the model: the chat goes on
                self.write(f"error: {exc}\n")
            show_prompt(f"[{self.label}] you> ")
        self.write("\n")


def organism_direction(cm: ChatModel, write: Write) -> Direction:
    """The organism's refusal direction as `refdir run` selects it (layer 22, last position),
    from the mean difference of 64 harmful_train and 64 harmless_train prompts."""
    write(
        f"(no --direction: extracting the organism's at layer {ORGANISM_LAYER}, position -1, "
        f"from {ORGANISM_PROMPTS} + {ORGANISM_PROMPTS} training prompts)\n"
    )
    harmful = sample_prompts("harmful_train", ORGANISM_PROMPTS, 42)
    harmless = sample_prompts("harmless_train", ORGANISM_PROMPTS, 42)
    cands = extract_candidates(
        cm,
        harmful,
        harmless,
        progress=False,
        harmful_name="harmful_train",
        harmless_name="harmless_train",
    )
    return cands.direction(-1, ORGANISM_LAYER, rule="refdir chat: the organism's default")


def chat(
    options: ModelOptions,
    direction: Path | None,
    intervention: str,
    coeff: float,
    max_new_tokens: int,
    any_model: bool,
) -> None:
    if direction is None and options.model != ORGANISM:
        raise RefdirError(
            "--direction is needed for a model other than the organism: a direction folder "
            "or file (refdir extract) or a run folder (refdir run)"
        )
    chosen = Direction.load(direction, any_model=any_model) if direction is not None else None
    cm = load_model(options)
    if chosen is not None:
        chosen.fits(cm.layout)

    def write(text: str) -> None:
        typer.echo(text, nl=False)
        sys.stdout.flush()

    found = chosen if chosen is not None else organism_direction(cm, write)
    kinds = {
        "none": NONE,
        "ablate": Intervention.ablation(found),
        "add": Intervention.addition(found, coeff),
    }
    session = ChatSession(cm, found, write, max_new_tokens, coeff, kinds[intervention])
    write(
        f"refdir chat with {cm.name} (direction: layer {found.layer}, position "
        f"{found.position}); /help for commands\n"
    )
    session.run(sys.stdin, write)
