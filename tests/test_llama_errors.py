"""neuralink.Llama refuses what it cannot serve, with messages that name the problem and the fix."""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import gguf
import pytest

import neuralink
from neuralink import HookUnavailableError, ModelFileError, UnsupportedModelError

from conftest import ModelFactory


def test_stock_llama_cpp_python_without_hook_names_the_setup_command(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_cpp import llama_cpp as bindings

    # a libllama without the patch: no llama_set_ffn_hook symbol
    monkeypatch.setattr(bindings, "_lib", types.SimpleNamespace(_name="libllama.so"))
    with pytest.raises(HookUnavailableError, match=r"no FFN hook.*bash scripts/setup\.sh"):
        neuralink.Llama(str(smollm2_path), verbose=False)


def test_hook_api_version_mismatch_is_refused(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuralink.runtime import llama as llama_module

    built = llama_module._engine.FFN_HOOK_API_VERSION  # the library's, which the message names
    monkeypatch.setattr(llama_module._engine, "FFN_HOOK_API_VERSION", 999)
    with pytest.raises(HookUnavailableError, match=rf"version {built}.*version 999"):
        neuralink.Llama(str(smollm2_path), verbose=False)


def test_unsupported_ffn_form_names_architecture_and_layers(synthetic_model: ModelFactory) -> None:
    # phi3 stacks gate and up in one tensor (LLM_FFN_SWIGLU): llama.cpp never offers it to the hook
    path = synthetic_model("phi3", "f32")
    with pytest.raises(UnsupportedModelError, match=r"architecture 'phi3': 2 of 2 layers.*layer 0"):
        neuralink.Llama(str(path), n_ctx=128, verbose=False)


def test_mixture_of_experts_is_refused_before_loading(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    source = gguf.GGUFReader(synthetic_model("llama", "f32"))
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for field in source.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    writer.add_expert_count(4)
    for tensor in source.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        neuralink.Llama(str(path), n_ctx=128, verbose=False)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such model file"):
        neuralink.Llama(str(tmp_path / "absent.gguf"), verbose=False)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n" * 100)
    with pytest.raises(ModelFileError, match=r"notes\.gguf: not a (valid )?GGUF file"):
        neuralink.Llama(str(path), verbose=False)


def test_truncated_gguf_file(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    shutil.copy(synthetic_model("llama", "q8_0"), path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(ModelFileError, match=r"truncated\.gguf.*(beyond the end of the file|not a valid GGUF|truncated)"):
        neuralink.Llama(str(path), verbose=False)
