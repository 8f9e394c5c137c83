"""tinyGPT: train a small character-level GPT on your own text, then sample from it."""

from tinygpt.checkpoint import load_model as load
from tinygpt.config import ModelConfig, TinyGPTError, TrainConfig, get_preset
from tinygpt.generate import generate_text as generate
from tinygpt.generate import stream_text
from tinygpt.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "TinyGPTError", "get_preset", "load", "generate", "stream_text"]
