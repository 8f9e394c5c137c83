"""tinyGPT: train a small GPT (characters or a byte-level BPE) on your own text, then sample from it.

    import tinygpt
    model, tokenizer = tinygpt.load("runs/demo")
    print(tinygpt.generate(model, tokenizer, "ROMEO:", max_new_tokens=200, seed=1))

The names below load on first use, so `import tinygpt` (and the `tinygpt` command's
--help and argument errors) does not wait for torch to import.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "GPT": ("tinygpt.model", "GPT"),
    "ModelConfig": ("tinygpt.config", "ModelConfig"),
    "TrainConfig": ("tinygpt.config", "TrainConfig"),
    "get_preset": ("tinygpt.config", "get_preset"),
    "TinyGPTError": ("tinygpt.errors", "TinyGPTError"),
    "load": ("tinygpt.checkpoint", "load_model"),
    "generate": ("tinygpt.generate", "generate_text"),
    "stream_text": ("tinygpt.generate", "stream_text"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinygpt' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    # importing tinygpt.generate binds the module to the name `generate`; the function wins
    globals()[name] = value
    return value
