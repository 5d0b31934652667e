"""Read FFN activations of every token out of stock llama.cpp, through its eval callback.

llama.cpp names the tensors its graph builder makes ("ffn_swiglu-3" is layer 3's
SwiGLU output, the input of ffn_down) and, when a context has an eval callback
(``cb_eval``), asks it for each one whether it wants to see it (``ask=True``),
then computes the graph up to that tensor and shows it (``ask=False``).
``ActivationReader`` wraps that protocol for one model: it decodes windows of
tokens with logits requested at every position (the last layer runs its FFN
only on output rows) and hands each wanted tensor to a consumer as a numpy view
of llama.cpp's own buffer, without a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as bindings

from neuralink.errors import ModelFileError, NeuralinkError, OptionError, UnsupportedModelError
from neuralink.formats.files import check_file_magic

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGML_TYPE_F32 = 0
GGML_MAX_DIMS = 4

# called with (tensor base name, layer, rows x width float32 view valid only during the call)
TensorConsumer = Callable[[str, int, np.ndarray], None]


class _GgmlTensorHead(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h), unchanged across ggml releases."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ]


def _ggml_function(name: str, restype: type | None, *argtypes: type) -> Callable[..., object]:
    # libllama's handle resolves ggml-base symbols through its dependencies: the same ggml llama.cpp uses
    function = getattr(bindings._lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_ggml_get_name = _ggml_function("ggml_get_name", ctypes.c_char_p, ctypes.c_void_p)
_ggml_get_data = _ggml_function("ggml_get_data", ctypes.c_void_p, ctypes.c_void_p)
_ggml_nelements = _ggml_function("ggml_nelements", ctypes.c_int64, ctypes.c_void_p)
_ggml_is_contiguous = _ggml_function("ggml_is_contiguous", ctypes.c_bool, ctypes.c_void_p)


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path if it is a readable file starting with the GGUF magic; ModelFileError otherwise."""
    return check_file_magic(path, GGUF_MAGIC, "model file", "GGUF file")


@contextlib.contextmanager
def _llama_log_level() -> Iterator[None]:
    # llama-cpp-python prints llama.cpp's log unless its logger is raised: show it only when we are verbose
    llama_logger = logging.getLogger("llama-cpp-python")
    saved = llama_logger.level
    llama_logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.INFO) else logging.ERROR)
    try:
        yield
    finally:
        llama_logger.setLevel(saved)


class _DeferredInterrupt:
    """Around a llama_decode whose eval callback runs Python: Ctrl-C sets `pending` instead of raising. Raised at
    any bytecode of the callback (even before its try), KeyboardInterrupt would be lost at the C boundary ("Exception
    ignored on calling ctypes callback function") and the work would go on; the callback stops the graph at its
    next tensor instead, and leaving the block raises KeyboardInterrupt. Only in the main thread, and only where
    SIGINT has Python's default handler."""

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None

    def _note(self, _signum: int, _frame: object) -> None:
        self.pending = True

    def __enter__(self) -> None:
        self.pending = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._note)

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class ActivationReader(contextlib.AbstractContextManager["ActivationReader"]):
    """One model loaded in llama.cpp with an eval callback, decoding windows of up to `window` tokens.

    ``evaluate(tokens, wanted, consume)`` decodes one window (a BOS token is
    prepended when the model's tokenizer adds one; its row is not shown) and
    calls ``consume(base_name, layer, rows)`` for every tensor "<base_name>-<layer>"
    for which ``wanted(base_name)`` is true. Use as a context manager.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, window: int, threads: int | None = None) -> None:
        self.path = check_gguf_file(model_path)
        if window < 2:
            raise OptionError(f"window must hold at least 2 tokens, got {window}")
        self.window = window
        self._stack = contextlib.ExitStack()
        self._wanted: Callable[[str], bool] = lambda _name: False
        self._consume: TensorConsumer | None = None
        self._skip_rows = 0
        self._n_rows = 0
        self._error: BaseException | None = None
        # the callback object must outlive the context that calls it
        self._interrupt = _DeferredInterrupt()
        self._callback = bindings.ggml_backend_sched_eval_callback(self._on_eval)
        try:
            self._open(threads or os.cpu_count() or 1)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, threads: int) -> None:
        with _llama_log_level():
            model = bindings.llama_model_load_from_file(os.fsencode(self.path), bindings.llama_model_default_params())
        if not model:
            raise ModelFileError(f"{self.path}: llama.cpp could not load this GGUF (run with -v to see its log)")
        self._stack.callback(bindings.llama_model_free, model)
        self._model = model
        self._vocab = bindings.llama_model_get_vocab(model)
        self.n_layer = int(bindings.llama_model_n_layer(model))
        self.architecture = self._metadata("general.architecture")
        n_ctx_train = int(bindings.llama_model_n_ctx_train(model))
        if self.window > n_ctx_train:
            raise UnsupportedModelError(
                f"{self.path}: window of {self.window} tokens exceeds the model's training context {n_ctx_train}"
            )

        params = bindings.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.window
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        with _llama_log_level():
            ctx = bindings.llama_init_from_model(model, params)
        if not ctx:
            raise ModelFileError(f"{self.path}: llama.cpp could not create a context of {self.window} tokens")
        self._stack.callback(bindings.llama_free, ctx)
        self._ctx = ctx
        self._memory = bindings.llama_get_memory(ctx)

        batch = bindings.llama_batch_init(self.window, 0, 1)
        self._stack.callback(bindings.llama_batch_free, batch)
        self._batch = batch
        for i in range(self.window):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(self.window,))
        self._batch_pos = np.ctypeslib.as_array(batch.pos, shape=(self.window,))
        self._batch_logits = np.ctypeslib.as_array(batch.logits, shape=(self.window,))
        self._batch_pos[:] = np.arange(self.window)
        # every position's logits, so that the last layer's FFN runs on every row
        self._batch_logits[:] = 1

        self.adds_bos = bool(bindings.llama_vocab_get_add_bos(self._vocab))
        self.bos_token = int(bindings.llama_vocab_bos(self._vocab))

    def _metadata(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = bindings.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else ""

    @property
    def text_tokens_per_window(self) -> int:
        """Text tokens one window holds besides the BOS token."""
        return self.window - int(self.adds_bos)

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of `text` without special tokens, int32."""
        data = text.encode("utf-8")
        buf = (bindings.llama_token * (len(data) + 1))()
        n = bindings.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise NeuralinkError(f"{self.path}: tokenizing {len(data)} bytes needs {-n} tokens, more than bytes")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def evaluate(self, tokens: np.ndarray, wanted: Callable[[str], bool], consume: TensorConsumer, *,
                 bos: bool = True) -> None:
        """Decode `tokens` as a fresh sequence and show `consume` each wanted tensor's text rows.

        `bos=False` decodes `tokens` as given (a window cut from a tokenized text that already has its BOS)."""
        prefix = [self.bos_token] if self.adds_bos and bos else []
        n = len(prefix) + len(tokens)
        if not 0 < n <= self.window:
            raise ValueError(f"a window holds 1..{self.window - len(prefix)} text tokens, got {len(tokens)}")
        self._batch_tokens[: len(prefix)] = prefix
        self._batch_tokens[len(prefix) : n] = tokens
        self._batch.n_tokens = n
        bindings.llama_memory_clear(self._memory, True)
        self._wanted, self._consume = wanted, consume
        self._skip_rows, self._n_rows, self._error = len(prefix), n, None
        try:
            with self._interrupt:
                status = bindings.llama_decode(self._ctx, self._batch)
        finally:
            self._wanted, self._consume = (lambda _name: False), None
        if self._error is not None:
            raise self._error
        if status != 0:
            raise NeuralinkError(f"{self.path}: llama_decode failed with status {status} on {n} tokens")

    def logits(self, copy: bool = True) -> np.ndarray:
        """The last window's logits, (text tokens, n_vocab) float32: row k follows text token k. A copy, or with
        copy=False llama.cpp's own buffer, valid until the next evaluate."""
        n_vocab = int(bindings.llama_vocab_n_tokens(self._vocab))
        rows = np.ctypeslib.as_array(bindings.llama_get_logits(self._ctx), shape=(self._n_rows, n_vocab))
        return rows[self._skip_rows:].copy() if copy else rows[self._skip_rows:]

    def _on_eval(self, tensor: int, ask: bool, _user_data: int | None) -> bool:
        # an exception cannot cross the C boundary: keep the first, stop the graph, rethrow after decode
        try:
            if self._interrupt.pending and not ask:
                return False  # Ctrl-C: the graph stops here, and the decode's caller gets KeyboardInterrupt
            name = (_ggml_get_name(tensor) or b"").decode()
            base, _, layer = name.rpartition("-")
            if ask:
                return layer.isdigit() and self._wanted(base)
            assert self._consume is not None
            self._consume(base, int(layer), self._text_rows(tensor, name))
            return True
        except BaseException as e:
            if self._error is None:
                self._error = e
            return False

    def _text_rows(self, tensor: int, name: str) -> np.ndarray:
        head = _GgmlTensorHead.from_address(tensor)
        width = int(head.ne[0])
        rows = int(head.ne[1] * head.ne[2] * head.ne[3])
        if head.type != GGML_TYPE_F32 or not _ggml_is_contiguous(tensor):
            raise UnsupportedModelError(f"{self.path}: tensor {name} is not a contiguous F32 tensor")
        if width * rows != _ggml_nelements(tensor):
            raise UnsupportedModelError(f"{self.path}: tensor {name}: ggml_tensor layout differs from ggml.h")
        if rows != self._n_rows:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has {rows} rows for {self._n_rows} tokens "
                "(llama.cpp computed it for some tokens only)"
            )
        data = (ctypes.c_float * (width * rows)).from_address(_ggml_get_data(tensor))
        return np.ctypeslib.as_array(data).reshape(rows, width)[self._skip_rows :]

    def close(self) -> None:
        with _llama_log_level():
            self._stack.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["ActivationReader", "TensorConsumer", "check_gguf_file"]
