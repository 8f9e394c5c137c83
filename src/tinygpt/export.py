"""Export a run's model for other runtimes: a Hugging Face folder, or an ONNX graph.

**Hugging Face.** `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load the folder with no custom code, because each model
tinyGPT can export is, weight for weight, an architecture transformers already has:

    positions  norm       target       what makes it exact
    learned    LayerNorm  gpt2         GPT-2's Conv1D holds a weight as (in, out): ours, transposed
    rotary     LayerNorm  starcoder2   sliding_window = block_size: past block_size tokens, each
                                       position attends to the block_size most recent ones (itself
                                       included), as ours does (generate.py's context-window rule)
    rotary     RMSNorm    arcee        the same up to block_size tokens; arcee has no sliding window,
                                       so past that it attends to every earlier token and ours does not
    learned    RMSNorm    (refused)    gpt2 has LayerNorm only

All three are pre-norm blocks with an ungated MLP of 4 x n_embd and the same attention (one
key/value head per query head, scores scaled by 1/sqrt(head size), rotary angles from base
10000 rotating the two halves of each head). Our activations map to transformers' "gelu"
(torch's exact erf GELU; GPT-2's default "gelu_new" is the tanh approximation, which is not
ours), "relu" and "relu2" (ReLU squared). A bias our model lacks is exported as zeros: adding zero changes nothing.
Options no target has (post-norm blocks, as in the seed preset; a biased LM head; query/key
norms; soft-capped logits) are refused
with one line naming each option and the target that lacks it, and nothing is written.

The tokenizer: a BPE run's `tokenizer.json` ships as it is. A character vocabulary ships as a
`tokenizer.json` BPE whose vocabulary is the characters, with no merges, no normalizer and no
pre-tokenizer (no byte remapping), so every code point, emoji included, is one id: ours.
`tokenizer_config.json` names `PreTrainedTokenizerFast`, which loads that file as it is. One
difference remains: Hugging Face `tokenizers` silently drops a character the vocabulary lacks (a
BPE with no unknown token cannot do otherwise), where tinyGPT's own `encode` refuses it.

**ONNX.** One graph, `input_ids` (1, T) int64 -> `logits` (1, T, V) float32, for any T up to
block_size (the length stays symbolic in the graph), always causal; `--int8` adds
onnxruntime's dynamic quantization of it (int8 weights, activations quantized on the fly).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from tinygpt.checkpoint import best_or_last, build_model, load_model, read_record
from tinygpt.config import ModelConfig
from tinygpt.data import is_data_dir
from tinygpt.errors import ExportError
from tinygpt.model import GPT
from tinygpt.rundir import holds_run
from tinygpt.tokenizer import Tokenizer

FORMATS = ("hf", "onnx")
ROPE_BASE = 10000.0  # model.rotary_cos_sin's base


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: str  # "best" or "last"
    iteration: int
    target: str  # the Hugging Face architecture, or "onnx"
    files: list[str]


def export_run(run_dir: str | Path, out_dir: str | Path, format: str = "hf", int8: bool = False,
               overwrite: bool = False) -> ExportResult:
    """Write the run's best (else last) checkpoint into out_dir in `format` ("hf" or "onnx").
    Everything that can refuse (the run, the options, the folder, missing packages) does so
    before anything is written; the files are written beside out_dir and moved in at the end."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
    if int8 and format != "onnx":
        raise ExportError("--int8 is for --format onnx")
    run_dir, out = Path(run_dir), Path(out_dir)
    name = best_or_last(run_dir)
    record = read_record(run_dir, name)
    _, tokenizer, config = build_model(record, allocate=False)  # shapes only: the checks first
    target = hf_target(config) if format == "hf" else "onnx"
    check_out_dir(out, overwrite)
    if format == "onnx":
        _require_packages(["onnx", "onnxscript"] + (["onnxruntime"] if int8 else []), "--format onnx"
                          + (" --int8" if int8 else ""))
    tokenizer_json = tokenizer_json_text(tokenizer)
    model, _ = load_model(run_dir, name)
    if format == "hf":
        files = {
            "config.json": json.dumps(hf_config(model), indent=2).encode(),
            "model.safetensors": safetensors.torch.save(hf_tensors(model), metadata={"format": "pt"}),
            "tokenizer.json": tokenizer_json.encode(),
            "tokenizer_config.json": json.dumps(hf_tokenizer_config(config), indent=2).encode(),
        }

        def write(folder: Path) -> None:
            for file, data in files.items():
                (folder / file).write_bytes(data)
    else:
        def write(folder: Path) -> None:
            export_onnx(model, folder / "model.onnx")
            if int8:
                quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
            (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    written = _into_folder(out, write)
    return ExportResult(out, name, int(record["iteration"]), target, written)


# ----------------------------------------------------------------------------- the folder


def check_out_dir(out: Path, overwrite: bool) -> None:
    """--out must be new or empty; with --overwrite a folder of other files is allowed (only the
    files the export writes are replaced), but never a tinyGPT run or data folder, whose
    config.json and tokenizer.json an export would replace."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if holds_run(out) or is_data_dir(out):
        raise ExportError(f"--out {str(out)!r} holds a tinyGPT {'run' if holds_run(out) else 'data folder'}; "
                          f"export into a new folder")
    if not overwrite:
        raise ExportError(f"--out {str(out)!r} is not empty; choose a new folder, or pass --overwrite to replace "
                          f"the files of this export there (other files are left alone)")


def _into_folder(out: Path, write: Callable[[Path], None]) -> list[str]:
    """Run write(folder) on a fresh folder beside out, then move what it wrote into out (all of
    it, or on any error nothing). Returns the file names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        if out.is_dir():
            for name in names:
                os.replace(staging / name, out / name)
        else:
            os.rename(staging, out)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _require_packages(names: list[str], what: str) -> None:
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"{what} needs the Python packages {', '.join(names)}; missing: {', '.join(missing)} "
                          f"(pip install {' '.join(missing)})")


# ----------------------------------------------------------------------------- Hugging Face


def hf_target(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly what this config does, or an
    ExportError naming every option that has none."""
    if config.positions == "learned":
        target = "gpt2"
    else:
        target = "arcee" if config.norm_type == "rmsnorm" else "starcoder2"
    problems = []
    if config.positions == "learned" and config.norm_type == "rmsnorm":
        problems.append("norm_type=rmsnorm with learned positions (gpt2, the target for learned positions, "
                        "has LayerNorm only)")
    if config.norm == "post":
        problems.append(f"norm=post ({target} has pre-norm blocks only)")
    if config.lm_head_bias:
        problems.append(f"lm_head_bias=true ({target}'s LM head has no bias)")
    if config.qk_norm:
        problems.append(f"qk_norm=true ({target} has no query/key norm)")
    if config.logit_softcap:
        problems.append(f"logit_softcap={config.logit_softcap:g} ({target} does not cap its logits)")
    if problems:
        raise ExportError("no exact Hugging Face architecture for this run: " + "; ".join(problems))
    return target


def hf_config(model: GPT) -> dict[str, Any]:
    """config.json for the target architecture (every value that matters written out, not
    left to transformers' defaults, which are GPT-2's and StarCoder2's own sizes)."""
    config = model.config
    target = hf_target(config)
    C, dropout, eps = config.n_embd, config.dropout, model.final_norm.eps
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "dtype": "float32",
              "use_cache": True}
    if target == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": config.block_size, "n_embd": C, "n_layer": config.n_layer, "n_head": config.n_head,
                "n_inner": 4 * C, "activation_function": config.activation, "layer_norm_epsilon": eps,
                "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    rotary = {"hidden_size": C, "intermediate_size": 4 * C, "num_hidden_layers": config.n_layer,
              "num_attention_heads": config.n_head, "num_key_value_heads": config.n_head,
              "hidden_act": config.activation,
              "max_position_embeddings": config.block_size, "attention_dropout": dropout,
              # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta
              "rope_theta": ROPE_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE}}
    if target == "starcoder2":
        return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", **common, **rotary,
                "norm_epsilon": eps, "use_bias": config.bias or config.qkv_bias, "sliding_window": config.block_size,
                "residual_dropout": dropout, "embedding_dropout": dropout}
    return {"architectures": ["ArceeForCausalLM"], "model_type": "arcee", **common, **rotary,
            "head_dim": C // config.n_head, "rms_norm_eps": eps, "attention_bias": config.bias or config.qkv_bias,
            "mlp_bias": config.bias}


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under the target's names and layouts (float32, each its own memory)."""
    config = model.config
    ours = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    theirs = _gpt2_tensors(ours, config) if config.positions == "learned" else _rotary_tensors(ours, config)
    if not config.tie_embeddings:  # tied: transformers ties lm_head to the embedding itself
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    return {name: t.contiguous().clone() for name, t in theirs.items()}


def _bias(ours: dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    """Our bias, or zeros where the model has none (the target's layer always adds one)."""
    return ours[name] if name in ours else torch.zeros(size)


def _gpt2_tensors(ours: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    C = config.n_embd
    theirs = {"transformer.wte.weight": ours["token_embedding.weight"],
              "transformer.wpe.weight": ours["position_embedding.weight"],
              "transformer.ln_f.weight": ours["final_norm.weight"],
              "transformer.ln_f.bias": _bias(ours, "final_norm.bias", C)}
    # (ours, theirs, output size); Conv1D computes x @ W + b with W (in, out): our weight transposed
    linears = [("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
               ("mlp.up", "mlp.c_fc", 4 * C), ("mlp.down", "mlp.c_proj", C)]
    for i in range(config.n_layer):
        mine, gpt2 = f"blocks.{i}.", f"transformer.h.{i}."
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            theirs[f"{gpt2}{ln}.weight"] = ours[f"{mine}{norm}.weight"]
            theirs[f"{gpt2}{ln}.bias"] = _bias(ours, f"{mine}{norm}.bias", C)
        for linear, conv, size in linears:
            theirs[f"{gpt2}{conv}.weight"] = ours[f"{mine}{linear}.weight"].t()
            theirs[f"{gpt2}{conv}.bias"] = _bias(ours, f"{mine}{linear}.bias", size)
    return theirs


def _rotary_tensors(ours: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """starcoder2 and arcee: Llama's names, q/k/v as three matrices, one bias flag for all of
    attention (and starcoder2's for the MLP too)."""
    C, arcee = config.n_embd, config.norm_type == "rmsnorm"
    attention_bias = config.bias or config.qkv_bias
    mlp_bias = config.bias if arcee else attention_bias
    up, down = ("up_proj", "down_proj") if arcee else ("c_fc", "c_proj")
    theirs = {"model.embed_tokens.weight": ours["token_embedding.weight"],
              "model.norm.weight": ours["final_norm.weight"]}
    if not arcee:  # LayerNorm: always a bias there
        theirs["model.norm.bias"] = _bias(ours, "final_norm.bias", C)
    for i in range(config.n_layer):
        mine, hf = f"blocks.{i}.", f"model.layers.{i}."
        for norm, name in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
            theirs[f"{hf}{name}.weight"] = ours[f"{mine}{norm}.weight"]
            if not arcee:
                theirs[f"{hf}{name}.bias"] = _bias(ours, f"{mine}{norm}.bias", C)
        q, k, v = ours[f"{mine}attn.qkv.weight"].split(C, dim=0)  # rows: queries, keys, values
        qkv_bias = _bias(ours, f"{mine}attn.qkv.bias", 3 * C).split(C)
        projections = [("q_proj", q, qkv_bias[0]), ("k_proj", k, qkv_bias[1]), ("v_proj", v, qkv_bias[2]),
                       ("o_proj", ours[f"{mine}attn.proj.weight"], _bias(ours, f"{mine}attn.proj.bias", C))]
        for name, weight, bias in projections:
            theirs[f"{hf}self_attn.{name}.weight"] = weight
            if attention_bias:
                theirs[f"{hf}self_attn.{name}.bias"] = bias
        for linear, name, size in (("up", up, 4 * C), ("down", down, C)):
            theirs[f"{hf}mlp.{name}.weight"] = ours[f"{mine}mlp.{linear}.weight"]
            if mlp_bias:
                theirs[f"{hf}mlp.{name}.bias"] = _bias(ours, f"{mine}mlp.{linear}.bias", size)
    return theirs


def tokenizer_json_text(tokenizer: Tokenizer) -> str:
    """A standard tokenizer.json that gives exactly our ids: the BPE's own, or for characters a
    BPE with the characters as its vocabulary and nothing else (see the module docstring)."""
    if tokenizer.kind == "bpe":
        return tokenizer.json_text
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    surrogates = [c for c in tokenizer.chars if 0xD800 <= ord(c) <= 0xDFFF]
    if surrogates:
        raise ExportError(f"the vocabulary holds lone surrogate code points ({', '.join(map(ascii, surrogates[:3]))}), "
                          f"which a tokenizer.json cannot hold")
    characters = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
    characters.decoder = decoders.Fuse()  # ids back to text by concatenation (no decoder joins with spaces)
    return characters.to_str()


def hf_tokenizer_config(config: ModelConfig) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer (it reads tokenizer.json as it is, where
    a model's own tokenizer class would impose that model's pre-tokenizer), no spaces added
    around punctuation on decoding, and the longest text the model computes exactly (none for
    starcoder2, whose sliding window goes on past it)."""
    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                        "clean_up_tokenization_spaces": False}
    if hf_target(config) != "starcoder2":
        tokenizer_config["model_max_length"] = config.block_size
    return tokenizer_config


# ----------------------------------------------------------------------------- ONNX


class LogitsGraph(torch.nn.Module):
    """input_ids (1, T) -> logits (1, T, V) for T <= block_size: GPT.forward's steps with the
    causal mask written out, since torch.export cannot turn a symbolic T into SDPA's is_causal
    flag (GPT.forward passes `T > 1`)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model, T = self.model, input_ids.size(1)
        x = model.token_embedding(input_ids)  # (1, T, C)
        rotary = None
        if model.config.positions == "learned":
            x = x + model.position_embedding(torch.arange(T, device=input_ids.device))  # (1, T, C) + (T, C)
        else:
            rotary = (model.rotary_cos[:T], model.rotary_sin[:T])  # (T, hd/2) each
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # query i sees keys 0..i
        for block in model.blocks:
            x = block(x, rotary, mask)
        return model.head(model.final_norm(x))  # (1, T, V)


def export_onnx(model: GPT, path: Path) -> None:
    """Write the model as one ONNX graph (torch.onnx.export with dynamo) whose length is
    symbolic, from 1 to block_size."""
    import onnx

    block = model.config.block_size
    graph = LogitsGraph(model).eval()
    example = torch.zeros((1, min(block, 8)), dtype=torch.long)
    dynamic = {"input_ids": {1: torch.export.Dim("T", min=1, max=block)}} if block > 1 else None
    big = 4 * model.num_parameters() > 1.5e9  # a protobuf holds 2 GB at most: larger weights go beside it
    with torch.no_grad(), _quiet("torch.onnx"):
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["input_ids"],
                                    output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
        program.model.metadata_props.update({"tinygpt.block_size": str(block),
                                             "tinygpt.vocab_size": str(model.config.vocab_size)})
        program.save(str(path), external_data=big)
    length = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1]
    if block > 1 and not length.dim_param:
        raise RuntimeError(f"the exported graph fixed the length at {length.dim_value}: it should be symbolic")


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """onnxruntime's dynamic quantization: the matrices stored as int8 (one scale per tensor),
    activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(""):  # it advises pre-processing on the root logger: a note, not a problem
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The exporters' progress lines, notes and warnings (e.g. that torchvision's operators are
    skipped) are not the user's business: errors only, from that logger, warnings and stdout."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
