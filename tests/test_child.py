"""Child processes that die are reported as what they are: the step, the signal, the log."""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

from neuralink.child import describe_exit, map_in_children, run_in_child
from neuralink.errors import ChildProcessDied, ModelFileError


@pytest.fixture(autouse=True)
def logs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALINK_CACHE", str(tmp_path / "cache"))


def test_result_comes_back_and_leaves_no_log(tmp_path):
    assert run_in_child("summing", sum, [1, 2, 3]) == 6
    assert not list((tmp_path / "cache" / "logs").glob("*.log"))


def test_exceptions_keep_their_type():
    with pytest.raises(ModelFileError, match="broken.gguf"):
        run_in_child("converting", _raise_model_error, "broken.gguf")


def _raise_model_error(name):
    raise ModelFileError(f"{name}: not a GGUF")


def test_a_segfault_names_the_step_the_signal_and_a_log_with_the_stack():
    with pytest.raises(ChildProcessDied) as died:
        run_in_child("converting model.gguf", ctypes.string_at, 0)  # reads address 0
    message = str(died.value)
    assert message.startswith("converting model.gguf: the child process was killed by SIGSEGV")
    log = died.value.log_path
    assert os.fspath(log) in message
    assert "Segmentation fault" in log.read_text()  # faulthandler's stack of the crash


def test_a_worker_dying_in_a_map_is_reported():
    with pytest.raises(ChildProcessDied, match=r"placing a layer \(2/2\): the child process was killed by SIGABRT"):
        list(map_in_children("placing a layer", _abort_on_two, [1, 2], workers=2))
    assert sorted(map_in_children("placing a layer", abs, [-1, -2, 3], workers=2)) == [1, 2, 3]


def _abort_on_two(x):
    if x == 2:
        os.abort()
    return x


def test_describe_exit():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL (Killed)"
    assert describe_exit(3) == "exited with status 3 before returning a result"
