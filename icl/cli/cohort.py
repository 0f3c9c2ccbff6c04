"""A cohort: a folder of queries run by one command — split into shards for a cluster's job array (``--shard I/N``),
resumed by skipping outputs already written, and run by several worker processes on one machine (``--workers N``).

* Shards: the folder's queries in their listed (sorted) order, every N-th from offset I, so tasks 0..N-1 of a job
  array (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) split the cohort exactly, and their outputs,
  named after their queries, never collide.
* Resuming: every output is written atomically (a temp file, then a rename), so an output that exists is finished;
  a re-run skips it (``--overwrite`` redoes it). An interrupted cohort is resumed by running the same command again.
* Workers: each worker process builds its own segmenter once (the model, the supports read and prepared once) and
  takes the next query as it finishes one; the cores are shared (``icl.sparse.jobs``: each worker gets
  ``cores // N``, for its registrations and its torch threads), so nothing is oversubscribed.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from icl.api import ICLSegmenter
from icl.progress import lines_only
from icl.sparse.jobs import available_cores, set_cores

Job = Callable[[ICLSegmenter, Path, Path, Any], list[str]]  # (segmenter, query, output, options) -> lines to print


# ------------------------------------------------------------------------------------------------ workers
_worker: dict[str, Any] = {}  # in a worker process: its segmenter and the options


def _start(segmenter_kwargs: dict, cores: int, options: Any) -> None:
    """A worker's start: its share of the cores, progress as lines, one segmenter for all its queries."""
    set_cores(cores)
    torch.set_num_threads(cores)
    lines_only()
    _worker.update(segmenter=ICLSegmenter(**segmenter_kwargs), options=options)


def _work(job: Job, query: Path, out: Path) -> list[str]:
    return job(_worker["segmenter"], query, out, _worker["options"])


def run_queries(job: Job, segmenter_kwargs: dict, options: Any, pairs: Sequence[tuple[Path, Path]],
                workers: int = 1) -> Iterator[tuple[Path, Path, list[str]]]:
    """``job`` on every (query, output) pair: here, in order (one segmenter), or in ``workers`` processes (one
    segmenter each), yielding (query, output, lines) as each finishes. The first error stops the rest (outputs
    already written stay: they are complete)."""
    if workers <= 1 or len(pairs) <= 1:
        seg = ICLSegmenter(**segmenter_kwargs)
        for query, out in pairs:
            yield query, out, job(seg, query, out, options)
        return
    workers = min(int(workers), len(pairs))
    share = max(1, available_cores() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                               initargs=(segmenter_kwargs, share, options))
    pending = {pool.submit(_work, job, q, o): (q, o) for q, o in pairs}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                query, out = pending.pop(future)
                yield query, out, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
