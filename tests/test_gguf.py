"""GGUF export (llama.cpp): the file holds the tensors and metadata llama.cpp's gpt2 and starcoder2
graphs read, options with no exact target are refused with one line and nothing written, and
llama.cpp itself (through node-llama-cpp) tokenizes a prompt into exactly our ids and continues it
greedily exactly as we do, up to the block size, for both position kinds and both tokenizers."""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_run, words_text
from tinygpt.config import get_preset
from tinygpt.errors import CheckpointError, ExportError, TinyGPTError
from tinygpt.generate import generate_ids
from tinygpt.gguf_export import export_gguf, rwkv_escape
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer, train_bpe

gguf = pytest.importorskip("gguf")

NODE = Path(__file__).resolve().parent / "node"
BLOCK = 32
SIZES = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
TEXT = words_text(3000)
# node-llama-cpp's loader tokenizes "some test text here" and aborts the process when a character
# vocabulary lacks one of its characters (llama.cpp's rwkv tokenizer gives id -1 for it), so every
# test vocabulary has the lowercase letters; the rest covers escaping: quotes, a backslash, a tab,
# 2-, 3- and 4-byte UTF-8
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyz'\"\\\t?Çéï日😀"))
CHAR_PROMPT = "Ça va? The king 😀"
BPE_PROMPT = "Ça 😀 the king doth"
# the cpu preset's options (rotary, no biases at all) with GELU (llama.cpp's starcoder2 graph), and
# the default ones (learned, every bias)
ROPE_OPTIONS = {key: value for key, value in dataclasses.asdict(get_preset("cpu")[0]).items()
                if key in ("bias", "qkv_bias", "norm", "positions", "norm_type")} | {"activation": "gelu"}
LEARNED_OPTIONS = {"positions": "learned"}
RELU2_OPTIONS = ROPE_OPTIONS | {"activation": "relu2"}  # the cpu preset's own: llama.cpp's nemotron graph


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter([TEXT]), 300)


def make_run(run_dir: Path, tokenizer, seed: int = 2, **options) -> GPT:
    """helpers.random_run with this file's sizes."""
    return random_run(run_dir, tokenizer, SIZES, seed=seed, **options)


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("options, tied", [(LEARNED_OPTIONS, False), (LEARNED_OPTIONS, True),
                                           (ROPE_OPTIONS, False), (ROPE_OPTIONS, True),
                                           (RELU2_OPTIONS, False), (RELU2_OPTIONS, True)])
def test_the_file_holds_our_weights_under_llama_cpps_names_and_shapes(tmp_path, options, tied):
    model = make_run(tmp_path / "run", CharTokenizer(CHARS), tie_embeddings=tied, **options)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "run", tmp_path / "model.gguf"))
    arch = {"learned": "gpt2", "rope": "starcoder2"}[options["positions"]]
    if options.get("activation") == "relu2":
        arch = "nemotron"
    assert fields(reader)["general.architecture"] == arch
    V, C, T = len(CHARS), 32, BLOCK
    # shapes as llama.cpp's create_tensor asks for them, innermost dimension first
    expected = {"token_embd.weight": [C, V], "output_norm.weight": [C], "output_norm.bias": [C]}
    if not tied or arch == "nemotron":  # tied: gpt2 and starcoder2 read token_embd.weight, as we do
        expected["output.weight"] = [C, V]
    if arch == "gpt2":
        expected["position_embd.weight"] = [C, T]
    for i in range(2):
        for name, shape in [("attn_norm", [C]), ("attn_output", [C, C]), ("ffn_norm", [C]),
                            ("ffn_up", [C, 4 * C]), ("ffn_down", [4 * C, C])]:
            expected[f"blk.{i}.{name}.weight"] = shape
            expected[f"blk.{i}.{name}.bias"] = [shape[-1]]
        for name, shape in ([("attn_qkv", [C, 3 * C])] if arch == "gpt2" else
                            [("attn_q", [C, C]), ("attn_k", [C, C]), ("attn_v", [C, C])]):
            expected[f"blk.{i}.{name}.weight"] = shape
            expected[f"blk.{i}.{name}.bias"] = [shape[-1]]
    tensors = {t.name: t for t in reader.tensors}
    assert {name: list(t.shape) for name, t in tensors.items()} == expected
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    ours = model.state_dict()
    def same(name: str, tensor: torch.Tensor | None) -> None:
        want = np.zeros(tensors[name].data.shape, np.float32) if tensor is None else tensor.numpy()
        np.testing.assert_array_equal(tensors[name].data, want, err_msg=name)

    same("token_embd.weight", ours["token_embedding.weight"])
    if not tied or arch == "nemotron":
        same("output.weight", ours["lm_head.weight"])
    block = model.blocks[1]
    same("blk.1.ffn_up.weight", block.mlp.up.weight.detach())
    same("blk.1.ffn_down.bias", None if block.mlp.down.bias is None else block.mlp.down.bias.detach())
    same("blk.1.attn_norm.bias", None if block.norm1.bias is None else block.norm1.bias.detach())
    qkv = block.attn.qkv.weight.detach()
    if arch == "gpt2":
        same("position_embd.weight", ours["position_embedding.weight"])
        same("blk.1.attn_qkv.weight", qkv)
        same("blk.1.attn_qkv.bias", block.attn.qkv.bias.detach())
    else:  # our fused rows are q, k, v in order; q and k rows unpermuted (both rotate halves: NEOX)
        for part, rows in zip("qkv", qkv.split(C), strict=True):
            same(f"blk.1.attn_{part}.weight", rows)
            same(f"blk.1.attn_{part}.bias", None)  # the cpu preset has no biases: zeros

    meta = fields(reader)
    assert meta["general.architecture"] == arch
    assert {key: meta[f"{arch}.{key}"] for key in ("context_length", "embedding_length", "feed_forward_length",
                                                   "block_count", "attention.head_count",
                                                   "attention.head_count_kv")} == {
        "context_length": T, "embedding_length": C, "feed_forward_length": 4 * C, "block_count": 2,
        "attention.head_count": 2, "attention.head_count_kv": 2}
    assert meta[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    if arch in ("starcoder2", "nemotron"):
        assert (meta[f"{arch}.rope.dimension_count"], meta[f"{arch}.rope.freq_base"]) == (16, 10000.0)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False


def test_a_character_vocabulary_is_rwkvs_escaped_utf8(tmp_path):
    chars = CHARS + ["\x00", "\x7f", "\u00a0"]
    make_run(tmp_path / "run", CharTokenizer(chars))
    meta = fields(gguf.GGUFReader(export_gguf(tmp_path / "run", tmp_path / "model.gguf")))
    assert meta["tokenizer.ggml.model"] == "rwkv"
    assert "tokenizer.ggml.pre" not in meta and "tokenizer.ggml.eos_token_id" not in meta
    tokens = meta["tokenizer.ggml.tokens"]
    # llama.cpp unescapes \xNN with lowercase hex only, and "\\" + any other character as that one
    assert all(re.fullmatch(r"(\\x[0-9a-f]{2}|\\\\|[ -\[\]-~])+", token) for token in tokens), tokens
    assert [codecs.escape_decode(token)[0] for token in tokens] == [c.encode("utf-8") for c in chars]
    assert rwkv_escape("😀\\a\n".encode()) == "\\xf0\\x9f\\x98\\x80\\\\a\\x0a"


def test_a_bpe_vocabulary_is_gpt2s_with_its_merges_and_no_ordinary_token_as_eos(tmp_path, bpe):
    make_run(tmp_path / "run", bpe, **ROPE_OPTIONS)
    meta = fields(gguf.GGUFReader(export_gguf(tmp_path / "run", tmp_path / "model.gguf")))
    hf = json.loads(bpe.json_text)["model"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.tokens"] == [bpe.tokenizer.id_to_token(i) for i in range(bpe.vocab_size)]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in hf["merges"]]
    # llama.cpp would take id 11 (here ",") as BOS/EOS and stop generating at the first comma
    assert bpe.token_bytes[11] == b","
    assert bpe.token_bytes[meta["tokenizer.ggml.eos_token_id"]] == b"\xff"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("options, named", [
    ({"norm": "post"}, "norm=post"),
    ({"lm_head_bias": True}, "lm_head_bias=true"),
    ({"activation": "relu"}, "activation=relu"),
    ({"norm_type": "rmsnorm", "positions": "rope"}, "norm_type=rmsnorm"),
    (dataclasses.asdict(get_preset("seed")[0]), "norm=post"),
    ({"activation": "relu2", "positions": "learned"}, "activation=relu2 with positions=learned"),
    ({"activation": "relu2", "positions": "rope", "norm": "post"}, "norm=post"),
])
def test_an_option_with_no_exact_target_is_one_line_and_nothing_written(tmp_path, options, named):
    options = {key: value for key, value in options.items() if key != "vocab_size"}
    make_run(tmp_path / "run", CharTokenizer(CHARS), **{**options, **SIZES})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError) as error:
        export_gguf(tmp_path / "run", out / "model.gguf")
    message = str(error.value)
    assert named in message and "\n" not in message
    assert re.search(r"llama\.cpp's (gpt2|starcoder2|nemotron) graph", message)
    assert list(out.iterdir()) == []


def test_a_file_in_the_way_is_kept_unless_overwrite_is_given(tmp_path):
    make_run(tmp_path / "run", CharTokenizer(CHARS))
    target = tmp_path / "model.gguf"
    target.write_bytes(b"mine")
    with pytest.raises(ExportError, match="exists; pass overwrite"):
        export_gguf(tmp_path / "run", target)
    assert target.read_bytes() == b"mine"
    assert export_gguf(tmp_path / "run", target, overwrite=True) == target
    assert fields(gguf.GGUFReader(target))["general.architecture"] == "gpt2"
    assert target.stat().st_mode & 0o777 == 0o644  # a file to share, not a temporary file's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "run"]  # no temporary file left
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(tmp_path / "run", tmp_path / "run", overwrite=True)


def test_a_foreign_or_corrupt_run_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export_gguf(tmp_path / "notes", tmp_path / "a.gguf")
    make_run(tmp_path / "run", CharTokenizer(CHARS))
    (tmp_path / "run" / "best.json").write_text("{not json")
    with pytest.raises(TinyGPTError) as error:
        export_gguf(tmp_path / "run", tmp_path / "a.gguf")
    assert "corrupt" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "a.gguf").exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    make_run(tmp_path / "run", CharTokenizer(CHARS))
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    closed = []
    original_close = gguf.GGUFWriter.close
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    monkeypatch.setattr(gguf.GGUFWriter, "close", lambda self: closed.append(self) or original_close(self))
    with pytest.raises(ExportError, match="could not write .*No space left on device"):
        export_gguf(tmp_path / "run", out / "model.gguf")
    assert list(out.iterdir()) == []
    assert len(closed) == 1  # the writer's file was closed, not left open


# ----------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="session")
def node_llama_cpp() -> Path:
    """node-llama-cpp (llama.cpp's prebuilt binaries for node), installed once into a cache folder."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the llama.cpp check needs node (>= 20) and npm: node-llama-cpp comes from npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if not re.fullmatch(r"v(\d+)\..*", version) or int(version[1:].split(".")[0]) < 20:
        pytest.skip(f"node-llama-cpp needs node >= 20; this is node {version}")
    try:
        result = subprocess.run(["bash", str(NODE / "install-node-llama-cpp")], capture_output=True, text=True,
                                timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("installing node-llama-cpp took over 30 minutes")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"node-llama-cpp could not be installed (npm: {last})")
    return Path(result.stdout.strip().splitlines()[-1])


def run_llama_cpp(install: Path, jobs: list[dict], folder: Path) -> list[dict]:
    """tests/node/gguf_check.mjs on the jobs: llama.cpp's prompt ids, greedy ids and their text."""
    (folder / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    result = subprocess.run(["node", str(NODE / "gguf_check.mjs"), str(install), str(folder / "jobs.json")],
                            capture_output=True, text=True, encoding="utf-8", timeout=600)
    if result.returncode == 3:
        pytest.skip(f"llama.cpp's prebuilt binaries do not run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_llama_cpp_tokenizes_and_continues_greedily_as_we_do_up_to_the_block_size(tmp_path, bpe, node_llama_cpp):
    cases = {  # name: (tokenizer, options, prompt); tied and untied for each architecture
        "learned-char": (CharTokenizer(CHARS), {**LEARNED_OPTIONS}, CHAR_PROMPT),
        "learned-bpe": (bpe, {**LEARNED_OPTIONS, "tie_embeddings": True}, BPE_PROMPT),
        "rope-char": (CharTokenizer(CHARS), {**ROPE_OPTIONS, "tie_embeddings": True}, CHAR_PROMPT),
        "rope-bpe": (bpe, {**ROPE_OPTIONS}, BPE_PROMPT),
        "relu2-char": (CharTokenizer(CHARS), {**RELU2_OPTIONS}, CHAR_PROMPT),
        "relu2-bpe": (bpe, {**RELU2_OPTIONS, "tie_embeddings": True}, BPE_PROMPT),
    }
    jobs, ours = [], {}
    for name, (tokenizer, options, prompt) in cases.items():
        model = make_run(tmp_path / name, tokenizer, **options)
        prompt_ids = tokenizer.encode(prompt)
        steps = BLOCK - len(prompt_ids)  # prompt and continuation fill the block exactly
        assert steps >= 12
        ids, gaps = [], []
        for next_ids, probs in generate_ids(model, prompt_ids, steps, temperature=0, with_probs=True):
            ids.append(int(next_ids[0]))
            top = probs[0].log().topk(2).values
            gaps.append(float(top[0] - top[1]))
        # the check is exact agreement, so the test model must have no near tie on its path
        # (llama.cpp's GELU and sums differ from ours by far less than this)
        assert min(gaps) > 5e-3, f"{name}: near tie on the greedy path ({min(gaps):.1e}): pick another seed"
        ours[name] = (prompt_ids, ids, tokenizer.decode(ids))
        path = export_gguf(tmp_path / name, tmp_path / f"{name}.gguf")
        jobs.append({"model": str(path), "prompt": prompt, "steps": steps, "context": BLOCK})
    theirs = run_llama_cpp(node_llama_cpp, jobs, tmp_path)
    for (name, (prompt_ids, ids, text)), result in zip(ours.items(), theirs, strict=True):
        assert result["prompt_ids"] == prompt_ids, name  # no BOS, no prefix space, same pieces
        assert result["ids"] == ids, name
        if name.endswith("char"):  # (a BPE's whole-text detokenize drops a space before ",.?!")
            assert result["text"] == text, name


def test_the_cli_writes_model_gguf_into_a_folder_or_a_named_file(tmp_path):
    from helpers import assert_ok, assert_one_line_error, run_cli

    make_run(tmp_path / "run", CharTokenizer(CHARS))
    printed = assert_ok(run_cli("export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "out")).stdout
    assert (tmp_path / "out" / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert str(tmp_path / "out" / "model.gguf") in printed
    assert_ok(run_cli("export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "mine.gguf"))
    assert fields(gguf.GGUFReader(tmp_path / "mine.gguf"))["general.architecture"] == "gpt2"
    line = assert_one_line_error(run_cli("export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "out"))
    assert "exists; pass overwrite" in line  # the first file stays
    line = assert_one_line_error(run_cli("export", tmp_path / "run", "--format", "gguf", "--int8",
                                         "--out", tmp_path / "other"))
    assert "--int8 is for --format onnx" in line and not (tmp_path / "other").exists()
