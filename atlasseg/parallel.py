"""Where registrations run: one process (n_jobs 1), joblib (loky processes or threads) or a Dask cluster.

Work units carry paths and ids, never SimpleITK objects built in the caller, so any worker
(another process, another machine) reads its own images and builds its own filters. ITK
threads per worker are budgeted so that workers × threads ≤ the cores given. Long maps
show a progress bar on a terminal (tqdm), unless turned off (``--quiet``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

import SimpleITK as sitk
from joblib import Parallel, delayed, parallel_config

from .config import ParallelConfig
from .errors import AtlassegError

log = logging.getLogger("atlasseg")

#: Progress bars: None shows them when stderr is a terminal and INFO messages are on; True/False forces.
progress_bars: bool | None = None

_client = None  # the Dask client of the current session, if any


def available_cores() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(parallel: ParallelConfig, n_tasks: int) -> tuple[int, int]:
    """(jobs, ITK threads per job) with jobs × threads ≤ cores (of this machine, or a local Dask cluster's).

    On a Dask cluster of other machines every worker thread runs one job with
    ``itk_threads`` (default 1) ITK threads: a worker started with one thread per core stays within its cores.
    """
    if parallel.backend == "dask" and parallel.scheduler:  # jobs run on the cluster's machines, not this one
        jobs = sum(_client.nthreads().values()) if _client is not None else 1
        return max(1, min(jobs, n_tasks)), parallel.itk_threads or 1
    cores = available_cores()
    jobs = cores if parallel.n_jobs == -1 else parallel.n_jobs
    jobs = max(1, min(jobs, n_tasks, cores))
    threads = parallel.itk_threads or max(1, cores // jobs)
    return jobs, min(threads, max(1, cores // jobs))


def local_threads(parallel: ParallelConfig) -> int:
    """Threads for work this process does alone, between the parallel jobs (fusion): the jobs × threads that
    :func:`thread_budget` grants on this machine, or all its cores where the jobs ran on a Dask cluster's."""
    if parallel.backend == "dask" and parallel.scheduler:
        return available_cores()
    jobs, threads = thread_budget(parallel, available_cores())
    return jobs * threads


@contextlib.contextmanager
def session(parallel: ParallelConfig):
    """Hold a Dask client for a whole run (``backend: dask``): the cluster at ``scheduler``, or a local
    cluster on the loopback interface started for the run and closed after it. Other backends need none."""
    global _client
    if parallel.backend != "dask" or _client is not None:
        yield
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise AtlassegError(
            "parallel.backend: dask needs the distributed package: pip install 'atlasseg[dask]'"
        ) from None
    with contextlib.ExitStack() as stack:
        if parallel.scheduler:
            try:
                _reachable(parallel.scheduler)
                client = stack.enter_context(Client(parallel.scheduler, timeout="30s"))
            except (OSError, TimeoutError, ValueError) as err:
                raise AtlassegError(
                    f"parallel.scheduler: cannot reach the Dask scheduler at {parallel.scheduler} "
                    f"({getattr(err, 'strerror', None) or err})"
                ) from None
        else:
            jobs = available_cores() if parallel.n_jobs == -1 else min(parallel.n_jobs, available_cores())
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
                )
            )
            client = stack.enter_context(Client(cluster))
        log.info("Dask cluster %s: %d worker thread(s)", client.scheduler.address, sum(client.nthreads().values()))
        _client = client
        try:
            yield
        finally:
            _client = None


def _reachable(address: str) -> None:
    """Fail at once (OSError) where nothing listens at a ``tcp://host:port`` address: Dask would retry until its
    timeout."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme == "tcp":
        socket.create_connection((parts.hostname, parts.port or 8786), timeout=10).close()


def _show_progress() -> bool:
    if progress_bars is not None:
        return progress_bars
    return sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str, leave: bool = False):
    """A tqdm progress bar on stderr (a silent one when bars are off), as wide as the terminal, or 80 columns
    by 24 lines where the terminal reports no size (0 columns: tqdm would draw nothing)."""
    from tqdm.auto import tqdm

    size = {"dynamic_ncols": True} if _terminal_reports_a_size() else {"ncols": 80, "nrows": 24}
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not _show_progress(), unit=unit, **size)


def _terminal_reports_a_size() -> bool:
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # not a terminal, or no file descriptor: tqdm measures none either
        return True
    return columns > 1 and lines > 1


def log_above_bars():
    """While progress bars are drawn, atlasseg's log lines are printed above them instead of through them."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[log]) if _show_progress() else contextlib.nullcontext()


_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


def _exit_with(parent: int) -> None:
    """Make this worker process (of a process pool run by process ``parent``) end when ``parent`` dies, even
    when killed with SIGKILL: else it (and so loky's resource tracker, which waits for every worker) lives on
    for minutes. Linux: the kernel sends SIGKILL (prctl's parent-death signal); elsewhere a thread checks every
    second whether the parent is gone. The loky pool's worker initializer."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="atlasseg-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _indexed(index: int, function, args: tuple, threads: int):
    return index, function(*args, threads)


def parallel_map(function, tasks: list[tuple], parallel: ParallelConfig, *, desc: str) -> list:
    """``[function(*task, itk_threads) for task in tasks]``, in parallel as configured, in the tasks' order."""
    if not tasks:
        return []
    jobs, threads = thread_budget(parallel, len(tasks))
    results: list = [None] * len(tasks)
    with progress(total=len(tasks), desc=desc, unit="registration") as bar:
        if parallel.backend == "dask":
            with session(parallel):
                from distributed import as_completed

                futures = [
                    _client.submit(_indexed, i, function, task, threads, pure=False) for i, task in enumerate(tasks)
                ]
                for future in as_completed(futures):
                    index, results[index] = future.result()
                    bar.update()
        elif jobs == 1:
            for index, task in enumerate(tasks):
                results[index] = function(*task, threads)
                bar.update()
        else:
            workers = {"initializer": _exit_with, "initargs": (os.getpid(),)} if parallel.backend == "loky" else {}
            with parallel_config(backend=parallel.backend, **workers):
                run = Parallel(n_jobs=jobs, return_as="generator_unordered")
            for index, result in run(delayed(_indexed)(i, function, task, threads) for i, task in enumerate(tasks)):
                results[index] = result
                bar.update()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(available_cores())
    return results
