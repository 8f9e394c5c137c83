"""tinyGPT: train a small character-level GPT on your own text, then sample from it."""

import os

# OpenMP threads that spin while they wait for a sibling thread are ruinous on a CPU shared
# with other busy processes: the sibling is descheduled and every parallel op waits a time
# slice. Measured on a loaded 2-core machine: training 10x and cached generation 90x slower
# than with sleeping waits. It must be set before torch starts OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tinygpt.checkpoint import load_model as load
from tinygpt.config import ModelConfig, TinyGPTError, TrainConfig, get_preset
from tinygpt.generate import generate_text as generate
from tinygpt.generate import stream_text
from tinygpt.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "TinyGPTError", "get_preset", "load", "generate", "stream_text"]
