"""Work in child processes whose death is reported as what it is.

A child that segfaults or is killed would otherwise surface as a bare
``BrokenProcessPool`` traceback. Here each child runs one call, with
``faulthandler`` writing the Python stack of a fatal signal to a crash log;
when it dies, the caller gets a ``ChildProcessDied`` naming the step, the
signal (or exit status) and the log.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from neuralink.errors import ChildProcessDied
from neuralink.paths import cache_dir

T = TypeVar("T")


def log_dir() -> Path:
    """Where crash logs of child processes go: $NEURALINK_CACHE/logs (default ~/.cache/neuralink/logs)."""
    return cache_dir("logs")


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGSEGV (Segmentation fault)' for a negative exit code, else 'exited with status N'."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
            return f"was killed by {sig.name} ({signal.strsignal(sig) or 'signal'})"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode} before returning a result"


def _new_log(step: str) -> Path:
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in step)[:40]
    fd, name = tempfile.mkstemp(prefix=f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=directory)
    os.close(fd)
    return Path(name)


def _die_with_parent() -> None:
    # not a daemon (daemons may not have children of their own), so ask Linux to end us with the parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_main(conn: Any, log_path: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    _die_with_parent()
    with open(log_path, "a") as log:
        # the Python stack of a fatal signal goes to the log (and stderr, which the user sees)
        faulthandler.enable(log, all_threads=True)
        try:
            result: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            log.write(traceback.format_exc())
            log.flush()
            result = (False, e)
        try:
            conn.send(result)
        except Exception as e:  # an unpicklable result or exception: send its text instead
            detail = "".join(traceback.format_exception(result[1])) if not result[0] else ""
            conn.send((False, RuntimeError(f"{type(e).__name__} sending the result back: {e}\n{detail}")))
        conn.close()


def run_in_child(step: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh (spawned) process; its result or exception comes back.

    Spawned, not forked: the parent may hold llama.cpp threads, which fork would copy
    in a broken state. Raises ChildProcessDied when the child dies without a result.
    """
    log_path = _new_log(step)
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(sender, str(log_path), fn, args, kwargs))
    process.start()
    sender.close()
    try:
        try:
            ok, value = receiver.recv()
        except EOFError:
            process.join()
            raise ChildProcessDied(step, describe_exit(process.exitcode), log_path) from None
        process.join()
    except KeyboardInterrupt:
        process.terminate()
        process.join()
        raise
    finally:
        receiver.close()
    if ok:
        log_path.unlink(missing_ok=True)  # nothing to keep: the call returned
        return value
    raise value


def map_in_children(step: str, fn: Callable[[Any], T], items: Iterable[Any], workers: int) -> Iterator[T]:
    """``fn(item)`` for every item, each in its own child, ``workers`` at a time; results as they finish."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # threads only wait on their children, so the GIL is not a bottleneck
        futures = [pool.submit(run_in_child, f"{step} ({i + 1}/{len(items)})", fn, item) for i, item in enumerate(items)]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def report_child_death(step: str, returncode: int, stderr: str, *, log_name: str | None = None) -> ChildProcessDied:
    """The error for a subprocess that ended with `returncode`: its stderr is kept in a log."""
    log_path = _new_log(log_name or step)
    log_path.write_text(stderr)
    return ChildProcessDied(step, describe_exit(returncode) if returncode < 0 else f"exited with status {returncode}",
                            log_path)


__all__ = ["ChildProcessDied", "describe_exit", "log_dir", "map_in_children", "report_child_death", "run_in_child"]
