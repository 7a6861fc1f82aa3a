from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from refdir.model.chat_model import ChatModel
from tiny import tiny_chat_model

torch.set_num_threads(1)  # tiny models gain nothing from threads; oversubscribed OpenMP spins


@pytest.fixture
def cm() -> ChatModel:
    return tiny_chat_model("llama")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole `refdir run` on a tiny model, with every optional part but the benchmarks (the
    suffix step, the random-direction KL): read it, or copy it (``run_copy``) to change it."""
    from refdir.study.run import run_pipeline
    from tiny import TINY_RUN

    out = tmp_path_factory.mktemp("finished") / "run"
    config = TINY_RUN.model_copy(
        update={
            "suffix": True,
            "suffix_steps": 1,
            "n_suffix_prompts": 2,
            "n_suffix_eval": 2,
            "n_random_kl": 2,
        }
    )
    run_pipeline(config, out, progress=False, model=tiny_chat_model("llama"))
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of ``finished_run`` this test may change."""
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "run"))
