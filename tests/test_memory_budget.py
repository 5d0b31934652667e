"""A memory budget holds: the whole process's peak RSS (VmHWM) stays within it, whatever the settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert import random_placement

from neuralink.convert.writer import convert_model
from neuralink.formats.sizes import parse_size

# a fresh process per run: VmHWM is the peak of everything it did, from import to the last token
RUN = r"""
import json, sys
import neuralink
model, budget, n_batch, policy = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llm = neuralink.Llama(model, memory_budget=budget, n_batch=n_batch, cache_policy=policy, verbose=False)
prompt = " ".join(["The history of the city begins in the early medieval period, when a small settlement grew "
                   "around the river crossing and the market that served the farms of the valley."] * 6)
llm(prompt, max_tokens=40, temperature=0.0)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak": hwm, "cache": llm.memory_plan.cache, "minimum": llm.memory_plan.minimum}))
"""


@pytest.fixture(scope="module")
def converted_smollm2(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("budget") / "smollm2.neuralink.gguf"
    convert_model(smollm2_path, random_placement(smollm2_path), output)
    return output


@pytest.mark.parametrize(("budget", "n_batch", "policy"), [
    ("160MB", 64, "linking"), ("160MB", 16, "linking"), ("200MB", 16, "linking"), ("200MB", 128, "lru"),
    ("220MB", 32, "none"),
])
def test_peak_rss_stays_within_the_budget(converted_smollm2: Path, budget: str, n_batch: int, policy: str) -> None:
    result = subprocess.run([sys.executable, "-c", RUN, str(converted_smollm2), budget, str(n_batch), policy],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["minimum"] <= parse_size(budget)
    assert run["peak"] <= parse_size(budget), (
        f"peak RSS {run['peak'] / 2**20:.1f} MiB over the {budget} budget (cache {run['cache'] / 2**20:.1f} MiB)")
