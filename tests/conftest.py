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
