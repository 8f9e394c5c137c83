"""`tinygpt export`: each exported model checked by the runtime that loads it. Hugging Face
transformers loads the folder with no custom code and gives our logits and our greedy text;
onnxruntime runs the ONNX graph (and its int8 variant); options with no exact target are refused
with one line and nothing written; the README's lines run as they are written."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MIXED_TEXT, assert_one_line_error, random_run, run_cli, words_text
from tinygpt import cli
from tinygpt.config import get_preset
from tinygpt.errors import ExportError, UnknownCharacterError
from tinygpt.export import export_run
from tinygpt.generate import generate_text
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer, train_bpe

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: Hello, world! Ça va? naïve café 😀🎉\nJULIET: "
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyz .,!?\n"))
BLOCK = 16
SIZES = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def cpu_preset_options() -> dict:
    """The cpu preset's options (rotary, pre-LN, ReLU², no biases, untied) at test sizes."""
    model, _ = get_preset("cpu")
    return {**dataclasses.asdict(model), **SIZES}


def make_run(run_dir: Path, tokenizer=None, **options) -> tuple[GPT, object]:
    """helpers.random_run with this file's sizes, a character vocabulary unless told."""
    tokenizer = tokenizer or CharTokenizer(CHARS)
    return random_run(run_dir, tokenizer, SIZES, seed=0, **options), tokenizer


def logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def load_hf(folder: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder)


def hf_greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
    return tokenizer.decode(output[0])


CASES = {
    # name: (options, target)
    "cpu-preset": (cpu_preset_options(), "starcoder2"),
    "rotary-tied-with-biases": (dict(positions="rope", bias=True, qkv_bias=False, tie_embeddings=True), "starcoder2"),
    "learned-untied-gelu": (dict(positions="learned", bias=True, qkv_bias=True), "gpt2"),
    "learned-tied-relu-no-bias": (dict(positions="learned", bias=False, qkv_bias=False, activation="relu",
                                       tie_embeddings=True), "gpt2"),
    "rmsnorm-rotary": (dict(positions="rope", norm_type="rmsnorm", bias=True, qkv_bias=False), "arcee"),
    "rmsnorm-rotary-tied": (dict(positions="rope", norm_type="rmsnorm", bias=False, qkv_bias=False,
                                 tie_embeddings=True), "arcee"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_export_and_gives_our_logits_and_greedy_text(tmp_path, case):
    options, target = CASES[case]
    model, tokenizer = make_run(tmp_path / "run", **options)
    assert export_run(tmp_path / "run", tmp_path / "hf").target == target
    hf_model, hf_tokenizer = load_hf(tmp_path / "hf")
    assert hf_model.config.model_type == target
    assert hf_model.config.tie_word_embeddings == options.get("tie_embeddings", False)

    ids = tokenizer.encode(TEXT[:BLOCK])
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)  # emoji and accents: one id each
    assert hf_tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert (theirs - logits(model, ids)).abs().max() < 1e-4

    # greedy text: within the block size for learned positions (GPT-2 has no position past it) and
    # arcee (no sliding window); past it, from a prompt longer than the block, for starcoder2
    prompt = TEXT[:6] if target != "starcoder2" else TEXT[: BLOCK + 8]
    new_tokens = BLOCK - len(prompt) if target != "starcoder2" else 200
    ours = generate_text(model, tokenizer, prompt, new_tokens, temperature=0)
    assert hf_greedy(hf_model, hf_tokenizer, prompt, new_tokens) == ours
    assert len(ours) == len(prompt) + new_tokens


def test_the_sliding_window_is_what_makes_starcoder2_exact_past_the_block_size(tmp_path):
    model, tokenizer = make_run(tmp_path / "run", **cpu_preset_options())
    export_run(tmp_path / "run", tmp_path / "hf")
    hf_model, _ = load_hf(tmp_path / "hf")
    assert hf_model.config.sliding_window == BLOCK
    ids = tokenizer.encode((TEXT * 2)[: 3 * BLOCK])
    ours = logits(model, ids)  # past block_size: each position sees the block_size most recent
    with torch.no_grad():
        assert (hf_model(torch.tensor([ids])).logits[0] - ours).abs().max() < 1e-4
        hf_model.config.sliding_window = None  # attend to everything instead: no longer our model
        assert (hf_model(torch.tensor([ids])).logits[0] - ours).abs().max() > 1e-2


def test_arcee_has_no_sliding_window_so_it_is_exact_up_to_the_block_size_only(tmp_path):
    model, tokenizer = make_run(tmp_path / "run", positions="rope", norm_type="rmsnorm")
    export_run(tmp_path / "run", tmp_path / "hf")
    hf_model, hf_tokenizer = load_hf(tmp_path / "hf")
    assert hf_tokenizer.model_max_length == BLOCK  # it says so
    ids = tokenizer.encode((TEXT * 2)[: 3 * BLOCK])
    with torch.no_grad():
        difference = (hf_model(torch.tensor([ids])).logits[0] - logits(model, ids)).abs().max(dim=-1).values
    assert difference[:BLOCK].max() < 1e-4 and difference[BLOCK:].max() > 1e-2


def test_a_bpe_run_ships_its_own_tokenizer_json(tmp_path):
    bpe = train_bpe(iter([(MIXED_TEXT + words_text(300, seed=1)) * 2]), 300)
    model, _ = make_run(tmp_path / "run", tokenizer=bpe, **cpu_preset_options())
    export_run(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8") == bpe.json_text
    hf_model, hf_tokenizer = load_hf(tmp_path / "hf")
    for text in (MIXED_TEXT, " leading space and  two", "Ωμέγα ☃ 𝄞 unseen"):
        assert hf_tokenizer(text)["input_ids"] == bpe.encode(text)
        assert hf_tokenizer.decode(bpe.encode(text)) == text
    ids = bpe.encode(MIXED_TEXT)[:BLOCK]
    with torch.no_grad():
        assert (hf_model(torch.tensor([ids])).logits[0] - logits(model, ids)).abs().max() < 1e-4


def test_an_unknown_character_is_dropped_by_transformers_and_refused_by_tinygpt(tmp_path):
    """The documented limitation: a BPE with no unknown token cannot refuse a character it lacks."""
    make_run(tmp_path / "run", positions="learned")
    export_run(tmp_path / "run", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = CharTokenizer(CHARS)
    assert "Z" not in CHARS
    assert hf_tokenizer("aZb")["input_ids"] == tokenizer.encode("ab")
    with pytest.raises(UnknownCharacterError):
        tokenizer.encode("aZb")


@pytest.mark.parametrize("options, named", [
    (dict(norm="post"), ["norm=post (gpt2 has pre-norm blocks only)"]),
    (dict(positions="rope", lm_head_bias=True), ["lm_head_bias=true (starcoder2's LM head has no bias)"]),
    (dict(positions="rope", norm_type="rmsnorm", norm="post"), ["norm=post (arcee has pre-norm blocks only)"]),
    (dict(norm_type="rmsnorm"), ["norm_type=rmsnorm with learned positions (gpt2"]),
])
def test_options_without_an_exact_target_are_refused_and_nothing_is_written(tmp_path, options, named):
    make_run(tmp_path / "run", **options)
    with pytest.raises(ExportError) as refused:
        export_run(tmp_path / "run", tmp_path / "hf")
    for words in named:
        assert words in str(refused.value)
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left either


def test_the_seed_preset_is_refused_with_one_line_naming_both_options(tmp_path):
    seed, _ = get_preset("seed")
    make_run(tmp_path / "run", **{**dataclasses.asdict(seed), **SIZES})
    line = assert_one_line_error(run_cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf"))
    assert "norm=post (gpt2 has pre-norm blocks only)" in line
    assert "lm_head_bias=true (gpt2's LM head has no bias)" in line
    assert not (tmp_path / "hf").exists()
    # the ONNX graph is our own model: every option exports
    assert export_run(tmp_path / "run", tmp_path / "onnx", format="onnx").files == ["model.onnx", "tokenizer.json"]


def test_the_output_folder_must_be_new_or_empty_unless_overwrite(tmp_path):
    make_run(tmp_path / "run", positions="learned")
    run_files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="is not empty"):
        export_run(tmp_path / "run", out)
    assert (out / "config.json").read_text() == "{}"
    result = export_run(tmp_path / "run", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # not one of the export's files: left alone
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in out.iterdir()) == sorted(result.files + ["notes.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(tmp_path / "run", empty)  # an empty folder needs no flag
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text('{"format": "tinygpt-data"}')
    # a run and a data folder (their config.json and tokenizer.json!) and a file, whatever the flags
    for folder, refusal in ((tmp_path / "run", "holds a tinyGPT run"), (data, "holds a tinyGPT data folder"),
                            (out / "notes.txt", "is a file")):
        with pytest.raises(ExportError, match=refusal):
            export_run(tmp_path / "run", folder, overwrite=True)
    assert sorted(p.name for p in data.iterdir()) == ["meta.json"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == run_files


@pytest.mark.parametrize("damage, message", [
    (lambda run: None, "no such run directory"),
    (lambda run: (run.mkdir(), (run / "best.json").write_text("{not json")), "corrupt"),
    (lambda run: (run.mkdir(), (run / "best.json").write_text('{"format": "other"}')), "not a tinygpt checkpoint"),
])
def test_a_missing_corrupt_or_foreign_run_is_one_line(tmp_path, damage, message):
    damage(tmp_path / "run")
    line = assert_one_line_error(run_cli("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "x"))
    assert message in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("options", [cpu_preset_options(), dict(positions="learned", tie_embeddings=True),
                                     dict(positions="rope", qk_norm=True, logit_softcap=2.0, activation="relu2",
                                          zero_init_proj=True)])
def test_onnxruntime_gives_our_logits_for_any_length_up_to_the_block_size(tmp_path, options):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer = make_run(tmp_path / "run", **options)
    export_run(tmp_path / "run", tmp_path / "onnx", format="onnx", int8=True)
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_param  # the length is symbolic, not fixed
    session = ort.InferenceSession(tmp_path / "onnx" / "model.onnx")
    quantized = ort.InferenceSession(tmp_path / "onnx" / "model.int8.onnx")
    ids = tokenizer.encode((TEXT * 2)[:BLOCK])
    for length in (1, 5, BLOCK):
        theirs = session.run(None, {"input_ids": np.array([ids[:length]])})[0][0]
        assert np.abs(theirs - logits(model, ids[:length]).numpy()).max() < 1e-4
    # past the block size there are no positions (learned) or angles (rotary)
    with pytest.raises(Exception, match="ONNXRuntimeError"):
        session.run(None, {"input_ids": np.array([ids + ids[:1]])})

    # int8 weights: not our numbers, so no 1e-4; what is asserted is that the logits stay close
    # (relative error measured at 3-4% on these models) and the argmax (the greedy choice) agrees
    # on most positions, from a file that is smaller
    full = session.run(None, {"input_ids": np.array([ids])})[0][0]
    int8 = quantized.run(None, {"input_ids": np.array([ids])})[0][0]
    assert np.linalg.norm(int8 - full) / np.linalg.norm(full) < 0.1
    assert (int8.argmax(-1) == full.argmax(-1)).mean() >= 0.9
    sizes = [(tmp_path / "onnx" / name).stat().st_size for name in ("model.int8.onnx", "model.onnx")]
    assert sizes[0] < 0.8 * sizes[1]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json")).encode(TEXT).ids == tokenizer.encode(TEXT)


def test_missing_onnx_packages_are_one_line_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    make_run(tmp_path / "run", positions="learned")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    with pytest.raises(ExportError, match=r"needs the Python packages onnx, onnxscript, onnxruntime; missing: "
                                          r"onnxscript \(pip install onnxscript\)"):
        export_run(tmp_path / "run", tmp_path / "onnx", format="onnx", int8=True)
    assert not (tmp_path / "onnx").exists()


def test_int8_is_for_onnx_only(tmp_path):
    make_run(tmp_path / "run", positions="learned")
    with pytest.raises(ExportError, match="--int8 is for --format onnx"):
        export_run(tmp_path / "run", tmp_path / "hf", int8=True)
    assert not (tmp_path / "hf").exists()


def readme_section() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return readme.split("## Use your model elsewhere", 1)[1].split("\n## ", 1)[0]


def test_the_readme_lines_run_as_written(tmp_path, monkeypatch):
    """The README's export commands and its one-line loads, executed verbatim on a cpu-preset run."""
    pytest.importorskip("onnxruntime")
    section = readme_section()
    commands = [line for line in re.findall(r"```bash\n(.*?)```", section, re.S)[0].splitlines()
                if line.startswith("tinygpt export")]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(commands) == 3 and len(snippets) == 2
    model, tokenizer = make_run(tmp_path / "runs" / "demo", **cpu_preset_options())
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert cli.main(shlex.split(command.split("#")[0])[1:]) == 0
    assert (tmp_path / "exported" / "gguf" / "model.gguf").read_bytes()[:4] == b"GGUF"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for snippet in snippets:
            exec(snippet, {})
    hf_text, onnx_line = printed.getvalue().rstrip("\n").rsplit("\n", 1)
    assert hf_text == generate_text(model, tokenizer, "ROMEO:", 100, temperature=0)
    assert onnx_line == f"(1, 6, {len(CHARS)})"
