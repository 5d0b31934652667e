"""ggml type names: ggml's own spelling of a type, and the types that can hold weights."""

from __future__ import annotations

from gguf import GGMLQuantizationType as QType

# integer and f64 tensors are not weights ggml can multiply with
_NOT_WEIGHT_TYPES = frozenset({QType.I8, QType.I16, QType.I32, QType.I64, QType.F64})


def resolve_weight_type(name: str) -> QType:
    """The ggml type called `name` ("q4_k", "Q8_0", "bf16", ...); ValueError if it cannot hold weights."""
    try:
        qtype = QType[name.upper()]
    except KeyError:
        known = ", ".join(t.name.lower() for t in QType if t not in _NOT_WEIGHT_TYPES)
        raise ValueError(f"unknown weight type {name!r}; expected one of: {known}") from None
    if qtype in _NOT_WEIGHT_TYPES:
        raise ValueError(f"{name!r} is not a weight type: ggml multiplies no integer or f64 matrices")
    return qtype


def ggml_type_name(qtype: QType) -> str:
    """ggml's own spelling of a type name (``ggml_type_name``): "q4_K", "q8_0", "bf16"."""
    name = qtype.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name
