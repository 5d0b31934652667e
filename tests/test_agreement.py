"""neuralink bench agreement: greedy continuations of stock llama.cpp and neuralink compared token by token."""

from __future__ import annotations

import re
import subprocess
import sys

from neuralink.evaluate.agreement import Agreement, greedy_agreement

from conftest import ModelFactory



def test_identical_fraction_and_first_difference() -> None:
    same = Agreement("p", [1, 2, 3, 4], [1, 2, 3, 4])
    assert (same.identical_fraction, same.first_difference) == (1.0, None)
    derailed = Agreement("p", [1, 2, 3, 4], [1, 9, 3, 4])  # one token differs, the rest realigns
    assert (derailed.identical_fraction, derailed.first_difference) == (0.75, 1)
    short = Agreement("p", [1, 2, 3, 4], [1, 2])  # stopped early: the missing tokens count as different
    assert (short.identical_fraction, short.first_difference) == (0.5, 2)


def test_the_dense_engine_agrees_with_stock_on_every_token(converted_model) -> None:
    # stock llama.cpp and the dense engine (all FFN weights in RAM: llama.cpp's arithmetic) on the same GGUF
    converted, _ = converted_model("llama", "q8_0")
    results = greedy_agreement(converted, converted, prompts=["the quick brown fox", "memory of the model"],
                               tokens=12, sidecar=False)
    assert len(results) == 2 and all(len(r.stock) == 12 for r in results)
    assert all(r.identical_fraction == 1.0 and r.first_difference is None for r in results)


def test_the_command_prints_a_row_per_prompt_and_the_mean(synthetic_model: ModelFactory, converted_model) -> None:
    converted, _ = converted_model("llama", "q8_0")
    done = subprocess.run([sys.executable, "-m", "neuralink", "bench", "agreement", str(synthetic_model("llama", "q8_0")),
                           str(converted), "--tokens", "4", "--predictor", "dense"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| .+ \| [01]\.\d\d \| (-|\d+) \|$", line)]
    assert len(rows) == 20 and "| **all 20** | **" in done.stdout


def test_on_vec_dot_kernels_the_dense_engine_agrees_with_stock_on_k_quants(synthetic_model: ModelFactory) -> None:
    # K-quant weights: llama.cpp's tiled GEMM (prompt batches) and repacked Q4_K weights sum in another order than
    # the engine's vec_dot; with both off (--vec-dot, which must be set before the process's first matmul: a
    # subprocess) every greedy token agrees, over many tokens, not only one step's logits
    model = synthetic_model("llama", "q4_K")
    done = subprocess.run([sys.executable, "-m", "neuralink", "bench", "agreement", str(model), str(model),
                           "--tokens", "48", "--vec-dot"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(llama.cpp on vec_dot kernels)" in done.stdout
    assert "| 20 identical |" in done.stdout, done.stdout


def test_densities_run_against_the_same_stock_pass_with_a_summary(synthetic_model: ModelFactory, converted_model,
                                                                  tmp_path) -> None:
    from test_predictor import CALIBRATION

    converted, _ = converted_model("llama", "q8_0")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "neuralink", "bench", "agreement", str(synthetic_model("llama", "q8_0")),
                           str(converted), "--tokens", "6", "--densities", "1,0.3", "--calibration", str(calibration)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = dict(re.findall(r"^\| (default|density [0-9.]+) \| ([01]\.\d{3}) \| \d+ of 20 \|$", done.stdout, re.M))
    assert set(summary) == {"default", "density 1", "density 0.3"}
    # every neuron is the dense model (the sidecar's default here: nothing was validated sparse), both agree alike
    assert summary["density 1"] == summary["default"]
    missing = subprocess.run([sys.executable, "-m", "neuralink", "bench", "agreement", str(converted), str(converted),
                              "--densities", "0.5"], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "--densities needs --calibration" in missing.stderr


def test_a_converted_model_is_compared_with_its_own_original_only(synthetic_model: ModelFactory,
                                                                  converted_model) -> None:
    converted, _ = converted_model("llama", "q8_0")
    other = synthetic_model("qwen2", "f16")  # stock text of another model would read as a broken conversion
    done = subprocess.run([sys.executable, "-m", "neuralink", "bench", "agreement", str(other), str(converted)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"{other}: is not the model {converted} was converted from" in done.stderr, \
        done.stderr[-2000:]
