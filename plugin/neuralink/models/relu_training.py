"""Train the ReLU^2 decoder of ``neuralink.models.relu_model`` on text, and measure it in PyTorch and llama.cpp.

Data: each training text is tokenized with the tokenizer GGUF's own llama.cpp
tokenizer (the one the exported model carries); the last `validation_fraction`
of every text is held out for validation, the rest concatenated (separated by
the end-of-text token) into one stream from which each step draws
`batch_size` windows at random offsets. The test text (emma.txt by default)
never enters training or any choice made during it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from neuralink.errors import NeuralinkError, TrainingError
from neuralink.evaluate.perplexity import scoring_windows
from neuralink.models.relu_model import DecoderShape, ReluDecoder

log = logging.getLogger(__name__)

# llama.cpp's name for relu(up . x)^2 in the arcee graph (build_ffn, LLM_FFN_RELU_SQR)
RELU_SQR_TENSOR = "ffn_sqr(relu)"
# SmolLM2's "<|endoftext|>", its document separator
DOCUMENT_SEPARATOR = "<|endoftext|>"

# called with (steps done, steps planned, training loss of the last step, learning rate)
StepCallback = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class TrainingConfig:
    """Model size and training recipe of one named configuration (see CONFIGS)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int
    batch_size: int  # windows of context_length tokens per step
    steps: int
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0  # on each residual branch, training only
    validation_fraction: float = 0.05
    eval_interval: int = 100  # steps between validation losses
    eval_windows: int = 8  # validation windows per check
    test_tokens: int = 32768  # tokens of the test text scored by perplexity and sparsity

    def shape(self, n_vocab: int) -> DecoderShape:
        return DecoderShape(n_vocab=n_vocab, n_layer=self.n_layer, n_embd=self.n_embd, n_ff=self.n_ff,
                            n_head=self.n_head, n_head_kv=self.n_head_kv, context_length=self.context_length)


CONFIGS: dict[str, TrainingConfig] = {
    # a few minutes' worth of model for tests: learns word statistics, not much more
    "tiny": TrainingConfig(n_layer=2, n_embd=64, n_ff=256, n_head=4, n_head_kv=2, context_length=128,
                           batch_size=8, steps=150, learning_rate=3e-3, warmup_steps=15, eval_interval=50,
                           eval_windows=4, test_tokens=2048),
    # the benchmark model
    "small": TrainingConfig(n_layer=6, n_embd=384, n_ff=1536, n_head=6, n_head_kv=2, context_length=512,
                            batch_size=8, steps=700, learning_rate=1.5e-3, warmup_steps=70, dropout=0.2),
}


@dataclass
class TrainingLog:
    """What happened during training."""

    steps_planned: int
    steps_done: int = 0
    seconds: float = 0.0
    train_losses: list[float] = field(default_factory=list)  # one per step
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, mean validation loss)

    @property
    def stopped_early(self) -> bool:
        return self.steps_done < self.steps_planned

    def recent_train_loss(self, steps: int = 50) -> float:
        """Mean training loss over the last `steps` steps (batches drawn at random: a noisy quantity)."""
        return float(np.mean(self.train_losses[-steps:]))


@dataclass(frozen=True)
class TrainingData:
    """Token streams: the training stream, its validation windows' source, the test text."""

    train: np.ndarray  # int64
    validation: np.ndarray  # int64, the held-out tails of the training texts, separated
    sources: tuple[str, ...]

    @property
    def n_train_tokens(self) -> int:
        return int(self.train.size)


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text at `path`; TrainingError naming the file and the problem otherwise."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise TrainingError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TrainingError(f"{path}: cannot read ({e.strerror})") from None


class Tokenizer:
    """llama.cpp's tokenizer of a GGUF file (vocabulary only), as the exported model will tokenize."""

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        import llama_cpp  # deferred: training itself needs only torch; llama.cpp loads for its tokenizer

        self.path = Path(gguf_path)
        self._llm = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        self.n_vocab = int(self._llm.n_vocab())
        separator = self._llm.tokenize(DOCUMENT_SEPARATOR.encode(), add_bos=False, special=True)
        if len(separator) != 1:
            raise TrainingError(f"{self.path}: {DOCUMENT_SEPARATOR} is not one token of this vocabulary")
        self.separator = int(separator[0])

    def encode(self, text: str) -> np.ndarray:
        """Token ids as the perplexity and profile code produce them (tokenize(add_bos=True), no specials)."""
        return np.asarray(self._llm.tokenize(text.encode("utf-8"), add_bos=True), dtype=np.int64)

    def close(self) -> None:
        self._llm.close()


def prepare_training_data(tokenizer: Tokenizer, paths: Sequence[str | os.PathLike[str]],
                          validation_fraction: float, min_tokens: int) -> TrainingData:
    """Tokenize the training texts and split off the tail of each for validation (module doc)."""
    if not 0.0 < validation_fraction < 0.5:
        raise TrainingError(f"validation fraction must be in (0, 0.5), got {validation_fraction}")
    separator = np.array([tokenizer.separator], dtype=np.int64)
    train_parts, validation_parts = [], []
    for path in paths:
        tokens = tokenizer.encode(read_text(path))
        cut = int(round(len(tokens) * (1.0 - validation_fraction)))
        train_parts += [tokens[:cut], separator]
        validation_parts += [tokens[cut:], separator]
    train = np.concatenate(train_parts[:-1]) if train_parts else np.zeros(0, dtype=np.int64)
    validation = np.concatenate(validation_parts[:-1]) if validation_parts else np.zeros(0, dtype=np.int64)
    if train.size < min_tokens or validation.size < min_tokens // 16:
        raise TrainingError(f"{len(train)} training tokens in {len(paths)} texts; at least {min_tokens} needed")
    return TrainingData(train, validation, tuple(os.fspath(p) for p in paths))


def learning_rate(step: int, config: TrainingConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio of it at the end of training.

    The end is the last step or, when `time_fraction` (of a time budget) runs ahead of the
    steps, the end of the time budget: a run cut short by time still finishes its decay.
    """
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = max((step - config.warmup_steps) / max(1, config.steps - config.warmup_steps), time_fraction)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bf16 logits, computed a few rows at a time in f32.

    The (tokens x 49152) logits are the biggest tensors of a step; the stock
    log_softmax + nll pair makes several full-size f32 copies of them, this
    never more than `chunk` rows: about 5x faster on CPU, same value.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        lse = torch.empty(logits.shape[0], dtype=torch.float32)
        for i in range(0, logits.shape[0], chunk):
            lse[i:i + chunk] = torch.logsumexp(logits[i:i + chunk].float(), dim=-1)
        picked = logits.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        scale = grad.float() / logits.shape[0]
        for i in range(0, logits.shape[0], ctx.chunk):
            # d loss / d logits = softmax - one_hot(target), over the number of rows
            g = (logits[i:i + ctx.chunk].float() - lse[i:i + ctx.chunk, None]).exp_()
            g[torch.arange(g.shape[0]), targets[i:i + ctx.chunk]] -= 1.0
            out[i:i + ctx.chunk] = g.mul_(scale)
        return out, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of logits (..., n_vocab) against targets (...)."""
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), 16)


def _optimizer(model: ReluDecoder, config: TrainingConfig) -> torch.optim.AdamW:
    # decay matrices (and the tied embedding), not norm weights
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def _windows_at(stream: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


@torch.no_grad()
def mean_loss(model: ReluDecoder, windows: torch.Tensor) -> float:
    """Mean next-token loss over windows (n, length), f32."""
    model.eval()
    logits = model(windows[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def train(
    model: ReluDecoder,
    data: TrainingData,
    config: TrainingConfig,
    *,
    seed: int,
    max_seconds: float | None = None,
    on_step: StepCallback | None = None,
) -> TrainingLog:
    """Train `model` in place on `data` (bf16 autocast, f32 master weights) for config.steps steps.

    Batches come from a numpy generator seeded with `seed`, so a run is
    reproducible for a given seed and thread count, unless `max_seconds`
    binds: then the learning rate decays by elapsed time instead of steps
    (see `learning_rate`) and training stops when the time is up, which
    depends on the machine's load.
    """
    length = config.context_length + 1
    if data.train.size <= length:
        raise TrainingError(f"{data.train.size} training tokens cannot fill a window of {length}")
    rng = np.random.default_rng(seed)
    validation_rng = np.random.default_rng([seed, 1])
    n_val = min(config.eval_windows, max(1, data.validation.size // length))
    val_starts = np.sort(validation_rng.integers(0, max(1, data.validation.size - length), n_val))
    validation = _windows_at(data.validation, val_starts, length)
    optimizer = _optimizer(model, config)
    record = TrainingLog(steps_planned=config.steps)
    start = time.perf_counter()
    for step in range(config.steps):
        elapsed = time.perf_counter() - start
        if max_seconds is not None and elapsed >= max_seconds:
            log.warning("stopping after step %d of %d: the time limit of %.0f s has passed",
                        record.steps_done, config.steps, max_seconds)
            break
        lr = learning_rate(step, config, elapsed / max_seconds if max_seconds is not None else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _windows_at(data.train, rng.integers(0, data.train.size - length, config.batch_size), length)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = cross_entropy(logits, batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        record.train_losses.append(loss.item())
        record.steps_done = step + 1
        if record.steps_done % config.eval_interval == 0 or record.steps_done == config.steps:
            record.validation.append((record.steps_done, mean_loss(model, validation)))
            log.info("step %d: train loss %.4f, validation loss %.4f", record.steps_done,
                     record.recent_train_loss(config.eval_interval), record.validation[-1][1])
        if on_step is not None:
            on_step(record.steps_done, config.steps, record.train_losses[-1], lr)
        record.seconds = time.perf_counter() - start
    if not record.validation or record.validation[-1][0] != record.steps_done:
        record.validation.append((record.steps_done, mean_loss(model, validation)))
    model.eval()
    return record


@dataclass(frozen=True)
class TextScore:
    """Per-token NLL of a text under the PyTorch model, on perplexity.py's windows."""

    token_nll: np.ndarray

    @property
    def nll(self) -> float:
        return float(self.token_nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def score_text(model: ReluDecoder, tokens: np.ndarray, *, n_ctx: int, stride: int | None = None,
               max_tokens: int | None = None) -> TextScore:
    """The NLL of each token neuralink.evaluate.perplexity.perplexity scores, with the same windows, in PyTorch (f32)."""
    model.eval()
    stride = stride if stride is not None else max(1, n_ctx // 2)
    tokens = tokens[:max_tokens] if max_tokens is not None else tokens
    nlls = []
    for window in scoring_windows(int(tokens.size), n_ctx, stride):
        logits = model(torch.from_numpy(tokens[window.begin:window.end])[None])[0]
        rows = slice(window.first_scored - 1 - window.begin, window.end - 1 - window.begin)
        targets = torch.from_numpy(tokens[window.first_scored:window.end])
        nlls.append(torch.nn.functional.cross_entropy(logits[rows].double(), targets, reduction="none").numpy())
    return TextScore(np.concatenate(nlls))


def text_windows(tokens: np.ndarray, window: int, max_tokens: int) -> list[np.ndarray]:
    """Consecutive windows of at most `window` tokens covering the first `max_tokens` tokens."""
    tokens = tokens[:max_tokens]
    return [tokens[i:i + window] for i in range(0, tokens.size, window)]


@torch.no_grad()
def relu_sparsity_torch(model: ReluDecoder, windows: Sequence[np.ndarray]) -> np.ndarray:
    """Per layer, the fraction of relu(up . x)^2 values that are exactly zero over the windows (f32)."""
    model.eval()
    zeros = np.zeros(model.shape.n_layer, dtype=np.int64)
    total = np.zeros(model.shape.n_layer, dtype=np.int64)

    def count(layer: int, act: torch.Tensor) -> None:
        zeros[layer] += int((act == 0).sum())
        total[layer] += act.numel()

    for tokens in windows:
        model(torch.from_numpy(tokens)[None], consumer=count)
    return zeros / np.maximum(total, 1)


def relu_sparsity_llama_cpp(model_path: str | os.PathLike[str], windows: Sequence[np.ndarray],
                            threads: int | None = None) -> np.ndarray:
    """Per layer, the fraction of exact zeros in llama.cpp's own "ffn_sqr(relu)" tensors over the windows."""
    from neuralink.profile.activations import ActivationReader  # deferred: llama_cpp loads libllama

    width = max(len(w) for w in windows)
    zeros: dict[int, int] = {}
    total: dict[int, int] = {}

    def count(_name: str, layer: int, rows: np.ndarray) -> None:
        zeros[layer] = zeros.get(layer, 0) + int(np.count_nonzero(rows == 0))
        total[layer] = total.get(layer, 0) + rows.size

    with ActivationReader(model_path, window=width, threads=threads) as reader:
        for tokens in windows:
            reader.evaluate(tokens.astype(np.int32), RELU_SQR_TENSOR.__eq__, count)
        n_layer = reader.n_layer
    if sorted(total) != list(range(n_layer)):
        raise NeuralinkError(f"{model_path}: llama.cpp showed {RELU_SQR_TENSOR} for layers {sorted(total)} "
                             f"of {n_layer}: not an arcee ReLU^2 model?")
    return np.array([zeros[il] / total[il] for il in range(n_layer)])


def config_summary(config: TrainingConfig) -> str:
    """The configuration as one line of key=value pairs (stored in the GGUF's metadata)."""
    return " ".join(f"{k}={v}" for k, v in asdict(config).items())


__all__ = [
    "CONFIGS", "RELU_SQR_TENSOR", "TextScore", "Tokenizer", "TrainingConfig", "TrainingData", "TrainingError",
    "TrainingLog", "config_summary", "cross_entropy", "learning_rate", "mean_loss", "prepare_training_data",
    "read_text", "relu_sparsity_llama_cpp", "relu_sparsity_torch", "score_text", "text_windows", "train",
]
