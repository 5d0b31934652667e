"""Perplexity: every token scored once, the NLL matches a direct computation, any Llama-like class works."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuralink import ModelFileError
from neuralink.cli import main as cli_main
from neuralink.evaluate.perplexity import paired_nll_difference, perplexity
from neuralink.runtime.scoring import TopTokens, divergence, row_log_total, scoring_windows, top_tokens

from conftest import ModelFactory, corpus

TEXT = (
    "The model reads the neuron of the layer, and the quick brown fox jumps over the lazy dog. "
    "We have more people for the first time, and it is not what they were about. "
) * 6


@given(st.integers(0, 3000), st.integers(2, 600), st.data())
def test_windows_score_each_token_once_with_the_promised_context(
    n_tokens: int, n_ctx: int, data: st.DataObject
) -> None:
    stride = data.draw(st.integers(1, n_ctx))
    windows = scoring_windows(n_tokens, n_ctx, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert scored == sorted(set(scored))  # each token at most once, in text order
    missing = set(range(1, n_tokens)) - set(scored)
    if stride < n_ctx:
        assert not missing
    else:  # non-overlapping windows: only each window's first token, which has no context
        assert missing <= set(range(0, n_tokens, n_ctx))
    for i, w in enumerate(windows):
        assert w.begin < w.first_scored < w.end <= w.begin + n_ctx
        if i > 0 and stride < n_ctx:
            assert w.first_scored - w.begin >= n_ctx - stride


def test_window_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="stride"):
        scoring_windows(100, 16, 17)
    with pytest.raises(ValueError, match="n_ctx"):
        scoring_windows(100, 1, 1)


def reference_nll(path: Path) -> np.ndarray:
    """Per-token NLL of TEXT from one evaluation of all its tokens, log-softmax in float64."""
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=True)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return -log_probs[np.arange(len(tokens) - 1), tokens[1:]]


def test_one_window_equals_a_direct_computation(synthetic_model: ModelFactory) -> None:
    path = synthetic_model("llama", "f32")
    expected = reference_nll(path)
    assert 150 < expected.size < 511
    result = perplexity(path, TEXT, n_ctx=512, stride=512)
    assert result.n_windows == 1 and result.n_scored == expected.size
    np.testing.assert_allclose(result.token_nll, expected, rtol=1e-5, atol=1e-5)
    assert result.perplexity == pytest.approx(np.exp(expected.mean()), rel=1e-5)


def test_window_nll_is_the_log_softmax_at_each_target() -> None:
    from neuralink.runtime.scoring import window_nll

    rng = np.random.default_rng(3)
    # a vocabulary as large as real ones, logits far from 0 (a naive exp overflows)
    logits = (rng.normal(0, 4, (9, 151936)) + 300).astype(np.float32)
    targets = rng.integers(0, logits.shape[1], 9)
    x = logits.astype(np.float64)
    peak = x.max(1)
    want = np.log(np.exp(x - peak[:, None]).sum(1)) + peak - x[np.arange(9), targets]
    for threads in (1, 2, 16):
        np.testing.assert_allclose(window_nll(logits, targets, threads), want, rtol=1e-6)
    # a strided view (every other row) is scored as its rows
    np.testing.assert_allclose(window_nll(logits[::2], targets[::2]), want[::2], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        window_nll(logits, np.full(9, logits.shape[1]))
    with pytest.raises(ValueError, match="one per row"):
        window_nll(logits, targets[:4])


def test_windows_cut_the_context(synthetic_model: ModelFactory) -> None:
    path = synthetic_model("llama", "f32")
    whole = perplexity(path, TEXT, n_ctx=512)
    strided = perplexity(path, TEXT, n_ctx=64, stride=32)
    assert strided.n_scored == whole.n_scored and strided.n_windows > 1
    # the first window's tokens see the same context either way; later ones see at most 64 tokens
    np.testing.assert_allclose(strided.token_nll[:63], whole.token_nll[:63], rtol=1e-5, atol=1e-5)
    assert not np.allclose(strided.token_nll[63:], whole.token_nll[63:], rtol=1e-3, atol=1e-3)
    disjoint = perplexity(path, TEXT, n_ctx=64, stride=64)
    assert disjoint.n_scored == whole.n_scored - (disjoint.n_windows - 1)


def test_max_tokens_and_llama_subclasses(synthetic_model: ModelFactory) -> None:
    evaluated: list[int] = []

    class CountingLlama(llama_cpp.Llama):
        def eval(self, tokens):  # type: ignore[no-untyped-def]
            evaluated.append(len(tokens))
            return super().eval(tokens)

    result = perplexity(synthetic_model("arcee", "f16"), TEXT, n_ctx=32, stride=16, max_tokens=100,
                        llama_factory=CountingLlama)
    assert result.n_scored == 99
    assert evaluated and max(evaluated) <= 32 and len(evaluated) == result.n_windows
    assert np.isfinite(result.token_nll).all()


def test_paired_difference_of_a_model_with_itself_is_zero(synthetic_model: ModelFactory) -> None:
    path = synthetic_model("llama", "f32")
    a = perplexity(path, TEXT, n_ctx=128)
    mean, error = paired_nll_difference(a, a)
    assert mean == 0.0 and error == 0.0
    with pytest.raises(ValueError, match="same scored tokens"):
        paired_nll_difference(a, perplexity(path, TEXT, n_ctx=128, max_tokens=50))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    peak = x.max(1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(1, keepdims=True))


def test_divergence_is_the_kl_over_the_top_tokens_with_the_rest_as_one() -> None:
    rng = np.random.default_rng(5)
    ref_logits = (rng.normal(0, 3, (40, 60)) + 50).astype(np.float32)
    other = (ref_logits + rng.normal(0, 0.5, ref_logits.shape)).astype(np.float32)
    targets = rng.integers(0, 60, 40)
    lp, lq = _log_softmax(ref_logits), _log_softmax(other)
    full = (np.exp(lp) * (lp - lq)).sum(1)

    def compare(k: int) -> tuple[TopTokens, np.ndarray, np.ndarray]:
        ref_total = row_log_total(ref_logits, targets, -lp[np.arange(40), targets])
        top = top_tokens(ref_logits, ref_total, k)
        d = divergence(other, row_log_total(other, targets, -lq[np.arange(40), targets]), top)
        return top, d.kld, d.same_top

    top, kld, same = compare(60)  # the whole vocabulary: the exact divergence
    np.testing.assert_allclose(kld, full, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(top.tokens[:, 0], ref_logits.argmax(1))
    assert (np.diff(top.logprobs, axis=1) <= 0).all()  # most likely first
    np.testing.assert_array_equal(same, ref_logits.argmax(1) == other.argmax(1))
    assert 0 < same.mean() < 1

    top, kld, _ = compare(5)  # five tokens and the rest: the divergence of the coarsened distributions
    keep = np.argsort(-lp, axis=1)[:, :5]
    p, q = np.exp(np.take_along_axis(lp, keep, 1)), np.exp(np.take_along_axis(lq, keep, 1))
    p_rest, q_rest = 1 - p.sum(1), 1 - q.sum(1)
    coarse = (p * np.log(p / q)).sum(1) + p_rest * np.log(p_rest / q_rest)
    np.testing.assert_allclose(kld, coarse, rtol=1e-6, atol=1e-9)
    assert (kld <= full + 1e-9).all() and (kld >= 0).all()

    ref_total = row_log_total(ref_logits, targets, -lp[np.arange(40), targets])
    same_model = divergence(ref_logits, ref_total, top_tokens(ref_logits, ref_total, 5))
    np.testing.assert_allclose(same_model.kld, 0.0, atol=1e-12)
    assert same_model.same_top.all()


def test_models_are_compared_with_the_reference_token_by_token(synthetic_model: ModelFactory) -> None:
    """A re-encoded model's divergence from the original equals a direct full-vocabulary computation."""
    exact, coarse = synthetic_model("llama", "f32"), synthetic_model("llama", "q4_0")
    ref = perplexity(exact, TEXT, n_ctx=512, stride=512, keep_top=100_000)  # more than the vocabulary: all of it
    assert ref.top is not None and ref.divergence is None
    result = perplexity(coarse, TEXT, n_ctx=512, stride=512, reference=ref)
    assert result.divergence is not None and result.top is None

    def log_probs(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
        try:
            tokens = llm.tokenize(TEXT.encode(), add_bos=True)
            llm.eval(tokens)
            return _log_softmax(np.asarray(llm.scores[: len(tokens) - 1]))
        finally:
            llm.close()

    lp, lq = log_probs(exact), log_probs(coarse)
    np.testing.assert_allclose(result.divergence.kld, (np.exp(lp) * (lp - lq)).sum(1), rtol=1e-3, atol=1e-6)
    assert result.divergence.mean_kld > 1e-4  # q4_0 moved the predictions
    np.testing.assert_array_equal(result.divergence.same_top, lp.argmax(1) == lq.argmax(1))

    itself = perplexity(exact, TEXT, n_ctx=512, stride=512, reference=ref)
    assert itself.divergence is not None and itself.divergence.mean_kld < 1e-9
    assert itself.divergence.top_agreement == 1.0
    # other tokens or other windows: nothing to compare token by token
    assert perplexity(coarse, TEXT, n_ctx=512, stride=512, max_tokens=50, reference=ref).divergence is None
    assert perplexity(coarse, TEXT, n_ctx=128, reference=ref).divergence is None


def test_errors_name_the_problem(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="absent.gguf: no such model file"):
        perplexity(tmp_path / "absent.gguf", TEXT)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(synthetic_model("llama", "f32"), "a", max_tokens=1)


def test_cli_prints_a_comparison_table(
    synthetic_model: ModelFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    model = synthetic_model("llama", "f32")
    code = cli_main(["perplexity", "--model", str(model), "--model", str(model), "--text", str(text),
                     "--n-ctx", "64"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(str(model)[:20]) or "..." in line]
    assert len(rows) == 2 and "+0.000%" in rows[1]
    assert "KLD +- s.e." in out and "0.00000 +- 0.00000     1.0000" in rows[1]  # a model against itself

    code = cli_main(["perplexity", "--model", str(model), "--text", str(tmp_path / "absent.txt")])
    assert code == 1 and "absent.txt: cannot read the text" in capsys.readouterr().err
    # window settings that cannot work are named by their option, before a model loads (this one does not exist)
    for flags, said in ((["--n-ctx", "1"], "--n-ctx 1: a window needs at least 2 tokens"),
                        (["--n-ctx", "64", "--stride", "65"], "--stride 65: at most --n-ctx (64)")):
        code = cli_main(["perplexity", "--model", str(tmp_path / "absent.gguf"), "--text", str(text), *flags])
        err = capsys.readouterr().err
        assert code != 0 and said in err and "absent.gguf" not in err


@pytest.mark.slow
def test_dense_inference_through_the_engine_within_half_a_percent_of_llama_cpp(
    smollm2_path: Path, tmp_path: Path
) -> None:
    """Issue 4's acceptance on SmolLM2 (Q4_1), held-out text: the engine's dense paths against stock llama.cpp."""
    import neuralink
    from neuralink.convert.writer import convert_model
    from neuralink.formats.ffn_tensors import inspect_ffn_model
    from neuralink.formats.files import file_sha256
    from neuralink.formats.placement import Placement

    model = inspect_ffn_model(smollm2_path)
    rng = np.random.default_rng(0)
    placement = Placement(
        "random", [rng.permutation(model.n_ff).astype(np.int32) for _ in range(model.n_layer)],
        [np.array([0], np.int32)] * model.n_layer, [np.full(model.n_ff, 0.2, np.float32)] * model.n_layer,
        np.full(model.n_layer, 0.1, np.float32), "gate_magnitude", 0, file_sha256(smollm2_path),
    )
    converted = convert_model(smollm2_path, placement, tmp_path / "smollm2.neuralink.gguf")
    text = corpus("emma.txt").read_text(encoding="utf-8")
    settings = dict(n_ctx=512, stride=512, max_tokens=2048)
    stock = perplexity(smollm2_path, text, **settings)
    # the dense engine: every FFN weight in RAM, llama.cpp's own arithmetic
    in_ram = perplexity(smollm2_path, text, llama_factory=neuralink.Llama, **settings)
    # every bundle read from the sidecar (down columns re-encoded in q8_0)
    from_sidecar = perplexity(converted.output, text, llama_factory=neuralink.Llama, sidecar=str(converted.sidecar),
                              predictor="dense", cache_policy="none", **settings)
    assert stock.n_scored > 2000
    for result in (in_ram, from_sidecar):
        assert result.perplexity <= stock.perplexity * 1.005
        mean, _ = paired_nll_difference(result, stock)
        assert abs(mean) < 0.005  # and not suspiciously better: the weights barely moved
