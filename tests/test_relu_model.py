"""The ReLU-native model: scripts/train_relu_model.py end to end (tiny config), export, llama.cpp agreement.

The end-to-end tests train the tiny configuration once (about two minutes on
2 cores) in a subprocess, as a user would run the script, and need the shared
corpora; the export tests use random weights and always run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from neuralink.models.relu_model import DecoderShape, ReluDecoder, export_gguf, load_gguf
from neuralink.models.relu_training import cross_entropy, relu_sparsity_llama_cpp, relu_sparsity_torch

from conftest import REPO_ROOT, corpus

SCRIPT = REPO_ROOT / "scripts" / "train_relu_model.py"
# held out from training: not in tinyshakespeare or little_women (a sentence of emma.txt's style, written here)
HELD_OUT = ("Mr. Knightley walked over from Donwell on a cold morning in November, and found Emma at her "
            "drawing, with Harriet reading aloud beside the fire and her father anxious about the weather.")


def run_script(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny configuration trained once: (GGUF path, the script's JSON report)."""
    for name in ("tinyshakespeare.txt", "little_women.txt", "emma.txt"):
        corpus(name)
    root = tmp_path_factory.mktemp("relu")
    out, report = root / "relu-tiny.gguf", root / "report.json"
    # about two minutes on an idle 2-core machine; the timeout leaves room for a busy one
    run = run_script("--config", "tiny", "--out", out, "--report", report, "--threads", "2", timeout=1500)
    assert run.returncode == 0, f"training failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "perplexity on emma.txt" in run.stdout and "natural sparsity" in run.stdout, run.stdout
    return out, json.loads(report.read_text())


def random_model(n_head_kv: int = 2, seed: int = 0) -> ReluDecoder:
    model = ReluDecoder(DecoderShape(n_vocab=49152, n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=n_head_kv,
                                     context_length=128))
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # weights well above init scale, so attention and RoPE matter to the logits
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.mul_(8.0 if name.startswith("layers") else 40.0)
            else:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def llama_cpp_logits(path: Path, text: str) -> tuple[list[int], np.ndarray]:
    # f32 KV cache: the default f16 cache alone moves logits by ~1e-3
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2,
                          verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)
        llm.eval(tokens)
        return tokens, np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("n_head_kv", [4, 2, 1])
def test_export_computes_what_llama_cpp_computes(tmp_path: Path, smollm2_path: Path, n_head_kv: int) -> None:
    model = random_model(n_head_kv)
    path = export_gguf(model, tmp_path / "random.gguf", smollm2_path)
    tokens, expected = llama_cpp_logits(path, HELD_OUT)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].numpy()
    assert np.abs(logits).max() > 1.0, "logits too small for the comparison to mean anything"
    # a wrong RoPE pairing, GQA grouping or transposed matrix moves logits by O(1)
    np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max())
    reloaded = load_gguf(path)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor([tokens]))[0].numpy(), logits)


def test_export_carries_smollm2_tokenizer(tmp_path: Path, smollm2_path: Path) -> None:
    path = export_gguf(random_model(), tmp_path / "random.gguf", smollm2_path, weight_type="q8_0")
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(smollm2_path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key
    assert ours.get_field("tokenizer.chat_template") is None  # never trained on chats
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    reference = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    assert llm.tokenize(HELD_OUT.encode()) == reference.tokenize(HELD_OUT.encode())
    types = {t.name: t.tensor_type for t in ours.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_export_refuses_a_mismatched_vocabulary(tmp_path: Path, smollm2_path: Path) -> None:
    model = ReluDecoder(DecoderShape(n_vocab=1000, n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1,
                                     context_length=64))
    with pytest.raises(ValueError, match="49152 tokens"):
        export_gguf(model, tmp_path / "bad.gguf", smollm2_path)
    assert list(tmp_path.iterdir()) == []


def test_chunked_cross_entropy_matches_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 500, generator=generator)).requires_grad_()
    targets = torch.randint(0, 500, (37,), generator=generator)
    ours = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = torch.nn.functional.cross_entropy(logits, targets)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_script_refuses_missing_corpora_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    run = run_script("--config", "tiny", "--out", out, "--data-dir", tmp_path / "nowhere", timeout=120)
    assert run.returncode == 1
    assert "corpus not found" in run.stderr and "emma.txt" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_script_refuses_an_unwritable_output(tmp_path: Path) -> None:
    data = tmp_path / "data"  # corpora present (their content is never read): the output is what is wrong
    data.mkdir()
    for name in ("tinyshakespeare.txt", "little_women.txt", "emma.txt"):
        (data / name).write_text("text\n")
    run = run_script("--config", "tiny", "--out", tmp_path / "missing-dir" / "model.gguf", "--data-dir", data,
                     timeout=120)
    assert run.returncode == 1
    assert "does not exist" in run.stderr


def test_tiny_model_is_arcee_with_ungated_ffn(tiny: tuple[Path, dict]) -> None:
    path, report = tiny
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "arcee"
    names = {t.name for t in reader.tensors}
    n_layer = report["settings"]["n_layer"]
    for il in range(n_layer):
        assert {f"blk.{il}.ffn_up.weight", f"blk.{il}.ffn_down.weight"} <= names
    assert not any("ffn_gate" in name for name in names)
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert report["steps_done"] == report["steps_planned"]


def test_tiny_model_generates_in_stock_llama_cpp(tiny: tuple[Path, dict]) -> None:
    path, report = tiny
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm.create_completion("It was a fine morning, and", max_tokens=16, temperature=0.0)
    finally:
        llm.close()
    # a 2-layer model trained for minutes may well continue greedily with newlines: any text is fine here
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"]
    # it learned something: far below the uniform perplexity of 49152, and PyTorch agrees on the same tokens
    assert report["test_perplexity_llama_cpp"] < 3000
    assert report["test_tokens_scored"] > 1000
    assert abs(report["test_nll_llama_cpp"] - report["test_nll_torch"]) < 1e-3
    assert report["validation_curve"][-1][1] < report["validation_curve"][0][1]


def test_tiny_model_is_natively_sparse_on_held_out_text(tiny: tuple[Path, dict]) -> None:
    path, _report = tiny
    tokens = np.asarray(llama_cpp_logits(path, HELD_OUT)[0], dtype=np.int64)
    in_llama_cpp = relu_sparsity_llama_cpp(path, [tokens], threads=2)
    in_torch = relu_sparsity_torch(load_gguf(path), [tokens])
    # ReLU^2 zeroes a large share of neurons by itself; a gated or SiLU FFN would show (almost) none
    assert np.all(in_llama_cpp > 0.3) and np.all(in_llama_cpp < 0.99), in_llama_cpp
    np.testing.assert_allclose(in_llama_cpp, in_torch, atol=0.01)


def test_training_is_deterministic(tmp_path: Path) -> None:
    for name in ("tinyshakespeare.txt", "little_women.txt", "emma.txt"):
        corpus(name)
    outputs = []
    for run_id in range(2):
        out = tmp_path / f"run{run_id}.gguf"
        run = run_script("--config", "tiny", "--steps", "4", "--seed", "7", "--threads", "2", "--test-tokens", "256",
                         "--out", out)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_trained_model_with_training_metadata_is_convertible(tmp_path: Path, smollm2_path: Path) -> None:
    from neuralink.formats.ffn_tensors import inspect_ffn_model

    path = export_gguf(random_model(), tmp_path / "trained.gguf", smollm2_path,
                       training_metadata={"config": "tiny", "steps": 4})
    assert gguf.GGUFReader(path).get_field("neuralink.training.steps") is not None
    # neuralink.training.* keys are not the mark of a converted model: neuralink convert must accept it
    assert not inspect_ffn_model(path).converted
