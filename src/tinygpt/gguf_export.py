"""GGUF export: a run as one file that llama.cpp (and everything built on it) runs as it is.

GGUF is llama.cpp's format: metadata (the architecture's sizes, the tokenizer) and named tensors
in one file. llama.cpp has no graph of its own for our GPT, but three of its built-in architectures
are our pre-LN, LayerNorm blocks, layer for layer:

    positions "learned", GELU -> gpt2      positions "rope", GELU -> starcoder2
    positions "rope", ReLU² (the `cpu` preset's) -> nemotron

Tensors (written in float32, each as the torch weight is: a Linear's (out, in) matrix is
llama.cpp's {in, out}, since GGUF lists dimensions innermost first):

    token_embd.weight             (V, C)      token_embedding.weight
    position_embd.weight          (T, C)      position_embedding.weight          (gpt2 only)
    blk.{i}.attn_norm.weight/bias (C,)        blocks.i.norm1
    blk.{i}.attn_qkv.weight/bias  (3C, C)     blocks.i.attn.qkv                  (gpt2: fused)
    blk.{i}.attn_q/k/v.weight/bias (C, C)     blocks.i.attn.qkv split in three   (starcoder2, nemotron)
    blk.{i}.attn_output.weight/bias (C, C)    blocks.i.attn.proj
    blk.{i}.ffn_norm.weight/bias  (C,)        blocks.i.norm2
    blk.{i}.ffn_up.weight/bias    (4C, C)     blocks.i.mlp.up
    blk.{i}.ffn_down.weight/bias  (C, 4C)     blocks.i.mlp.down
    output_norm.weight/bias       (C,)        final_norm
    output.weight                 (V, C)      lm_head.weight (when tied, gpt2 and starcoder2
                                              leave it out and read token_embd.weight, as we
                                              do; nemotron requires it: a copy of the embedding)

gpt2 and starcoder2 require every bias, nemotron those of its norms; those our model lacks
(bias=false, qkv_bias=false) are zeros, which computes the same. Our rotary positions rotate
the pair (x[i], x[i + hd/2]) of each head by position * 10000^(-2i/hd): starcoder2's and
nemotron's rope type in llama.cpp is NEOX, the same pairing, so no row of q or k is permuted.

Options these graphs lack are refused with one line naming the option (nothing is written):
post-LN blocks, a biased LM head, ReLU (no graph has it with LayerNorm), ReLU² with learned
positions (nemotron's are rotary), and RMSNorm (llama.cpp's RMSNorm graphs, llama and arcee,
differ from ours in their MLP or their rotary pairing; none is checked against ours here).

Where llama.cpp is close but not bit-exact (so its check is greedy-text agreement, not logits
to 1e-5): its GELU is the tanh approximation (at most 4.7e-4 from the exact erf GELU we use),
looked up in an fp16 table; its KV cache is fp16 unless asked for f32. And llama.cpp knows no
context window past the block size: starcoder2 and nemotron attend to every earlier position
(ours slides a block_size window), and gpt2 has no position past it, so they agree up to
block_size.

The tokenizer:

* byte-level BPE -> tokenizer.ggml.model "gpt2" with its tokens (GPT-2's byte spelling, as in
  tokenizer.json), its merges and tokenizer.ggml.pre "gpt-2", GPT-2's pre-tokenizer regex, which
  is ours. llama.cpp takes id 11 as BOS and EOS of a "gpt2" vocabulary that names none (in our
  BPE that is ","); our vocabulary has no such token, so both point at the token of byte 0xFF,
  which valid UTF-8 never holds, so nothing the model writes ends a generation early.
  (llama.cpp's detokenize of a whole sequence drops a space before "?!.," as GPT-2's tokenizer
  did; ids and each token's bytes are exact.)
* characters -> tokenizer.ggml.model "rwkv": llama.cpp matches the longest token of the raw
  UTF-8 bytes, with no byte remapping, no prefix space and no BOS or EOS; its tokens are
  written escaped as it reads them (printable ASCII as itself, a backslash doubled, every other
  byte as \\xNN). One id per character, as ours. Its tokenizer has no answer for a character
  outside the vocabulary (it emits id -1, or loops forever when the character's first bytes
  start a known one), so give llama.cpp text of the vocabulary's characters only. (node-llama-cpp's
  loadModel tokenizes "some test text here" to check the tokenizer, and its process aborts on
  the -1 when the vocabulary lacks one of those characters: any English corpus has them.)

Nothing is added to a text when it is tokenized: add_bos_token and add_eos_token are false.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygpt.checkpoint import best_or_last, fsync_directory, load_model, read_record
from tinygpt.config import ModelConfig, model_config_from_dict
from tinygpt.errors import ExportError
from tinygpt.model import GPT
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

__all__ = ["export_gguf", "architecture_for", "rwkv_escape"]

ROPE_BASE = 10000.0  # model.rotary_cos_sin's base
NEVER_IN_UTF8 = 0xFF  # a byte no valid UTF-8 text holds: the BPE's stand-in BOS/EOS


def architecture_for(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly this model, or one ExportError line
    naming the first option that has none."""
    if config.positions == "learned":
        arch = "gpt2"
    else:
        arch = "nemotron" if config.activation == "relu2" else "starcoder2"
    graph = f"llama.cpp's {arch} graph"
    if config.norm != "pre":
        raise ExportError(f"norm={config.norm} (post-LN blocks) has no exact GGUF target: {graph} is pre-LN")
    if config.lm_head_bias:
        raise ExportError(f"lm_head_bias=true has no exact GGUF target: {graph} has no output bias")
    if config.qk_norm:
        raise ExportError(f"qk_norm=true has no exact GGUF target: {graph} has no query/key norm")
    if config.logit_softcap:
        raise ExportError(f"logit_softcap={config.logit_softcap:g} has no exact GGUF target: "
                          f"{graph} does not cap its logits")
    if config.activation == "relu2" and arch == "gpt2":
        raise ExportError(f"activation=relu2 with positions=learned has no exact GGUF target: {graph} "
                          "hard-codes GELU, and nemotron's ReLU² graph has rotary positions")
    if config.activation not in ("gelu", "relu2"):
        raise ExportError(f"activation={config.activation} has no exact GGUF target: {graph} hard-codes GELU "
                          "(and nemotron's, ReLU²)")
    if config.norm_type != "layernorm":
        raise ExportError(f"norm_type={config.norm_type} has no exact GGUF target: {graph} uses LayerNorm, "
                          f"and llama.cpp's RMSNorm graphs (llama, arcee) are not checked against ours")
    return arch


def export_gguf(run_dir: str | Path, out_path: str | Path, overwrite: bool = False) -> Path:
    """Write the run's best (else last) checkpoint as the GGUF file out_path and return its path.
    Anything unsupported, a foreign or corrupt run, or a file in the way (without overwrite) is
    one TinyGPTError line, and then nothing is written. The file appears whole or not at all."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    name = best_or_last(run_dir)
    config = model_config_from_dict(read_record(run_dir, name)["model_config"])
    arch = architecture_for(config)
    if out_path.is_dir():
        raise ExportError(f"{str(out_path)!r} is a folder; give the path of the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{str(out_path)!r} exists; pass overwrite (--overwrite) to replace it")
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf") from None
    model, tokenizer = load_model(run_dir, name)
    vocab = vocab_metadata(tokenizer)
    tensors = gguf_tensors(model, arch)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        write_metadata(writer, gguf, arch, model.config, run_dir.resolve().name, vocab)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        writer = None
        os.chmod(tmp, 0o644)  # a file to share, not mkstemp's owner-only one
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        with contextlib.suppress(OSError):  # not every file system syncs a folder
            fsync_directory(out_path.parent)
    except OSError as e:
        raise ExportError(f"could not write {str(out_path)!r}: {e.strerror or e}") from None
    finally:
        if writer is not None:  # a failed write: close its file before removing it
            with contextlib.suppress(Exception):
                writer.close()
        Path(tmp).unlink(missing_ok=True)
    return out_path


def gguf_tensors(model: GPT, arch: str) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's names, in float32; the biases the model lacks as zeros."""

    def values(tensor: torch.Tensor | None, size: int = 0) -> np.ndarray:
        if tensor is None:  # a bias the model does without
            return np.zeros(size, dtype=np.float32)
        return np.ascontiguousarray(tensor.detach().float().cpu().numpy())

    def layer(name: str, module: torch.nn.Module, size: int) -> dict[str, np.ndarray]:
        return {f"{name}.weight": values(module.weight), f"{name}.bias": values(module.bias, size)}

    C = model.config.n_embd
    tensors = {"token_embd.weight": values(model.token_embedding.weight)}
    if arch == "gpt2":
        tensors["position_embd.weight"] = values(model.position_embedding.weight)
    for i, block in enumerate(model.blocks):
        tensors |= layer(f"blk.{i}.attn_norm", block.norm1, C)
        if arch == "gpt2":
            tensors |= layer(f"blk.{i}.attn_qkv", block.attn.qkv, 3 * C)
        else:  # starcoder2, nemotron: q, k and v apart (the layout every llama.cpp version reads)
            weights = np.split(values(block.attn.qkv.weight), 3)  # 3 x (C, C)
            biases = np.split(values(block.attn.qkv.bias, 3 * C), 3)  # 3 x (C,)
            for part, weight, bias in zip("qkv", weights, biases, strict=True):
                tensors[f"blk.{i}.attn_{part}.weight"] = np.ascontiguousarray(weight)
                tensors[f"blk.{i}.attn_{part}.bias"] = np.ascontiguousarray(bias)
        tensors |= layer(f"blk.{i}.attn_output", block.attn.proj, C)
        tensors |= layer(f"blk.{i}.ffn_norm", block.norm2, C)
        tensors |= layer(f"blk.{i}.ffn_up", block.mlp.up, 4 * C)
        tensors |= layer(f"blk.{i}.ffn_down", block.mlp.down, C)
    tensors |= layer("output_norm", model.final_norm, C)
    if not model.config.tie_embeddings or arch == "nemotron":  # nemotron has no tied head
        tensors["output.weight"] = values(model.lm_head.weight)
    return tensors


def write_metadata(writer: Any, gguf: Any, arch: str, config: ModelConfig, name: str,
                   vocab: dict[str, Any]) -> None:
    """The architecture's sizes and the tokenizer, under the keys llama.cpp reads."""
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_eps(1e-5)  # torch's LayerNorm default, which model.make_norm keeps
    if arch in ("starcoder2", "nemotron"):
        writer.add_rope_dimension_count(config.n_embd // config.n_head)
        writer.add_rope_freq_base(ROPE_BASE)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab["tokens"]))
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "eos" in vocab:
        writer.add_bos_token_id(vocab["eos"])
        writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def rwkv_escape(token: bytes) -> str:
    """A token's bytes as llama.cpp's rwkv vocabulary spells them (it unescapes \\xNN with
    lowercase hex digits and a backslash followed by any other character as that character)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else "\\\\" if b == 0x5C else f"\\x{b:02x}"
                   for b in token)


def vocab_metadata(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the GGUF's tokenizer keys hold for this tokenizer (see the module docstring)."""
    if isinstance(tokenizer, CharTokenizer):
        return {"model": "rwkv", "tokens": [rwkv_escape(token) for token in tokenizer.token_bytes]}
    if not isinstance(tokenizer, BPETokenizer):
        raise ExportError(f"a {type(tokenizer).__name__} has no GGUF tokenizer")
    data = json.loads(tokenizer.json_text)
    model = data["model"]
    pre = data.get("pre_tokenizer") or {}
    if data.get("normalizer") or data.get("added_tokens") or model.get("ignore_merges") or not pre.get("use_regex"):
        raise ExportError("this BPE has a normalizer, added tokens, ignore_merges or no GPT-2 regex: "
                          "llama.cpp's gpt2 tokenizer would not encode as it does")
    tokens = [tokenizer.tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges,
            "eos": tokenizer.token_bytes.index(bytes([NEVER_IN_UTF8]))}
