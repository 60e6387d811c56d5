"""Row blocks, for the elementwise work of the NumPy path.

A pass over a B × B float32 matrix (4 MiB at B = 1024) does not fit in a
core's L2 cache; a softmax makes several such passes (subtract, exp, sum,
divide). Cutting the rows into blocks of about 256 KiB lets each block run all
its passes while it stays in cache, and keeps the temporaries block-sized::

    def block(rows):                       # rows: a slice of the first axis
        xp.exp(S[rows], out=E[rows])       # writes only its own rows
        return E[rows].sum(axis=0)         # a partial result, combined by the caller

    partial_sums = for_row_blocks(block, n_rows=S.shape[0], row_size=S.shape[1], xp=xp)
    col_sum = sum(partial_sums)

The blocks depend only on the array's shape, so the results are the same bits
however the blocks are run. By default they run one after the other on the
calling thread. ``PAEFF_ROW_THREADS=N`` hands them to N threads (NumPy
releases the GIL inside its loops), each a run of consecutive blocks, so one
hand-off per thread and call. On the 2-core machine of the README it does
not pay: OpenBLAS's idle worker keeps spinning on the second core for a while
after each matrix product, and with it put to sleep at once
(``OPENBLAS_THREAD_TIMEOUT=1``) the passes, bound by memory, still scale
little (an exp over 4 Mi float32 numbers: 1.95 ms on one thread, 1.29 ms on
two). Steps timed in turn in one process, serial against 2 threads,
measured 77.4 against 78.3 ms and 79.7 against 78.6 ms.

Rules for ``fn``: it writes only its own rows, calls no matrix product (that
would fight BLAS's threads) and no ``for_row_blocks`` (the pool is shared).
On CuPy, and for arrays too small to be worth cutting, ``fn`` is called once
with all the rows: the same code, the same meaning.
"""
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_ELEMENTS = 1 << 16    # 256 KiB of float32 per block: a few such blocks stay in L2
MIN_ELEMENTS = 1 << 15      # below this, one call: the array fits in cache whole

_POOL = None


def n_threads():
    """Threads for the row blocks: ``PAEFF_ROW_THREADS`` (default 1: the blocks
    run one after the other on the calling thread)."""
    value = os.environ.get("PAEFF_ROW_THREADS", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"PAEFF_ROW_THREADS must be a whole number, got {value!r}") from None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=n_threads(), thread_name_prefix="paeff-rows")
    return _POOL


def row_blocks(n_rows, row_size):
    """Consecutive slices covering ``0..n_rows``, each about ``BLOCK_ELEMENTS``
    elements (``row_size`` per row), at least one row."""
    rows = max(1, BLOCK_ELEMENTS // max(1, row_size))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def for_row_blocks(fn, n_rows, row_size, xp=np):
    """``[fn(rows) for rows in row_blocks(n_rows, row_size)]``, in block order;
    on ``n_threads()`` threads when that is more than 1.

    ``xp`` is the array module of the arrays ``fn`` touches: on CuPy (and for
    fewer than ``MIN_ELEMENTS`` elements) the result is ``[fn(slice(0, n_rows))]``.
    """
    if xp is not np or n_rows * row_size < MIN_ELEMENTS:
        return [fn(slice(0, n_rows))]
    blocks = row_blocks(n_rows, row_size)
    if n_threads() == 1:
        return [fn(rows) for rows in blocks]
    # one hand-off per thread: thread t runs the t-th run of consecutive blocks,
    # in a copy of the caller's context (np.errstate, a context variable, holds there)
    k = n_threads()
    groups = [blocks[t * len(blocks) // k:(t + 1) * len(blocks) // k] for t in range(k)]
    run_group = lambda ctx, group: ctx.run(lambda: [fn(rows) for rows in group])
    contexts = [contextvars.copy_context() for _ in groups]
    return [r for part in _pool().map(run_group, contexts, groups) for r in part]
