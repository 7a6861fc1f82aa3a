"""One run folder as its steps see it: the options, the model (loaded when a step first asks
for it), and where the time of each step went (``timings.json``)."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from refdir.artifacts.run import TimingsRecord
from refdir.errors import RefdirError
from refdir.evaluation.benchmarks import ResolvedTasks
from refdir.model.chat_model import ChatModel
from refdir.model.loading import load_model
from refdir.stopwatch import Stopwatch
from refdir.study.config import RunConfig
from refdir.study.files import written_by

__all__ = ["Run", "versions"]

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """The versions of Python and the libraries a run's results depend on."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "refdir", "peft", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


class Run:
    """One run folder: its options, its model (loaded once, when first asked for) and the
    timings of its steps."""

    def __init__(
        self, config: RunConfig, out: Path, progress: bool = True, model: ChatModel | None = None
    ) -> None:
        self.config, self.out, self.progress = config, out, progress
        self._cm = model
        self.benchmark_tasks: ResolvedTasks | None = None  # resolved when the run was checked
        self.watch = Stopwatch()  # the parts of the step running now
        self._used_model = False  # whether the step running now asked for the model
        self.timings = TimingsRecord.read_lenient(out)

    @property
    def cm(self) -> ChatModel:
        self._used_model = True
        if self._cm is None:
            self._cm = load_model(self.config)
            check_hand_pick(self.config, self._cm)
        return self._cm

    def step_timings(self) -> dict[str, float]:
        """Wall time of the steps whose results are in the folder (the report's included), in
        the order the steps run."""
        return {
            step: seconds
            for step, seconds in self.timings.steps().items()
            if step == "report" or all((self.out / f).exists() for f in written_by(step))
        }

    def timing_fields(self) -> dict[str, Any]:
        """metrics.json's timing keys, for the steps :meth:`step_timings` lists: ``timings``,
        ``timing_parts`` (the timed parts of the select, evaluate and suffix steps) and
        ``timing_devices`` (the device each step ran its model on; steps that load no model,
        such as the report, have none)."""
        steps = self.step_timings()
        parts, devices = self.timings.parts, self.timings.devices
        return {
            "timings": steps,
            "timing_parts": {step: parts[step] for step in steps if parts.get(step)},
            "timing_devices": {step: devices[step] for step in steps if step in devices},
        }

    def timed(self, step: str, fn: Callable[[], None]) -> float:
        """Run ``fn`` as ``step``, record its time, parts and device; return its seconds."""
        self.watch = Stopwatch()
        self._used_model = False
        start = time.perf_counter()
        fn()
        seconds = round(time.perf_counter() - start, 2)
        parts = self.watch.rounded()
        timings = self.timings
        record = timings.model_copy(update={step: seconds})
        if parts:
            record.parts[step] = parts
        else:  # a step without timed parts
            record.parts.pop(step, None)
        if self._used_model and self._cm is not None:
            record.devices[step] = str(self._cm.device)
        else:
            record.devices.pop(step, None)
        self.timings = record
        record.write(self.out)
        log.info("step %s done in %.1f s", step, seconds)
        for name, part in parts.items():
            log.info("  %s: %.1f s", name, part)
        return seconds


def check_hand_pick(config: RunConfig, cm: ChatModel) -> None:
    """A hand-picked candidate must exist in this model: checked when it is loaded, before any
    step's work."""
    if config.layer is None or config.position is None:
        return
    n_post = cm.chat.n_post
    if not (0 <= config.layer < cm.n_layers and -n_post <= config.position <= -1):
        raise RefdirError(
            f"`layer={config.layer}` `position={config.position}` is not a candidate of "
            f"{cm.name}: `layer` must be in 0..{cm.n_layers - 1} and `position` in "
            f"-{n_post}..-1"
        )
