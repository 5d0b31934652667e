"""The README's Python example runs as written, on a converted SmolLM2, in a fresh process."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from test_convert import random_placement

from neuralink.convert.writer import convert_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_works_as_written(smollm2_path: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    example = blocks[0]
    assert '"model.neuralink.gguf"' in example
    converted = tmp_path / "model.neuralink.gguf"
    convert_model(smollm2_path, random_placement(smollm2_path), converted)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *text, counters = result.stdout.strip().splitlines()
    text = "\n".join(text)
    assert "Paris" in text
    stats = ast.literal_eval(counters)  # the dict the example prints
    assert set(stats) == {"reads", "bytes_read", "cache_hits"} and stats["reads"] > 0 and stats["bytes_read"] > 0
