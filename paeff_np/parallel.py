"""Threads over row blocks, for the elementwise work of the NumPy path.

A matrix product already runs on every core (BLAS has its own threads); the
elementwise passes around it (exp, sign, masks, sums over a B × B matrix,
erfc over a B × D one) run on one. NumPy and SciPy release the GIL inside
their ufunc loops and reductions, so cutting the rows into blocks and handing
the blocks to a few threads puts the other cores to work, and a block small
enough to stay in cache runs several passes for the price of one trip to
memory::

    def block(rows):                       # rows: a slice of the first axis
        xp.exp(S[rows], out=E[rows])       # writes only its own rows
        return E[rows].sum(axis=0)         # a partial result, combined by the caller

    partial_sums = for_row_blocks(block, n_rows=S.shape[0], row_size=S.shape[1], xp=xp)
    col_sum = sum(partial_sums)

Rules for ``fn``: it writes only its own rows, calls no matrix product (that
would fight BLAS's threads) and no ``for_row_blocks`` (the pool is shared).
On CuPy, and for arrays too small to pay for a thread, ``fn`` is called once
with all the rows: the same code, the same meaning.
"""
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_ELEMENTS = 1 << 16    # 256 KiB of float32 per block: a few such blocks stay in L2
MIN_ELEMENTS = 1 << 15      # below this, one call: a thread's hand-off costs more than it saves

_POOL = None


def n_threads():
    """The cores this process may run on (``os.sched_getaffinity`` where it exists)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


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
    """``[fn(rows) for rows in row_blocks(n_rows, row_size)]``, the blocks run on
    a thread pool; the results in block order.

    ``xp`` is the array module of the arrays ``fn`` touches: on CuPy (and when
    there is one core, or fewer than ``MIN_ELEMENTS`` elements) the result is
    ``[fn(slice(0, n_rows))]``.
    """
    if xp is not np or n_threads() == 1 or n_rows * row_size < MIN_ELEMENTS:
        return [fn(slice(0, n_rows))]
    blocks = row_blocks(n_rows, row_size)
    # each block runs in a copy of the caller's context: np.errstate (a context
    # variable) holds in the threads as it does in the caller
    contexts = [contextvars.copy_context() for _ in blocks]
    return list(_pool().map(lambda ctx, rows: ctx.run(fn, rows), contexts, blocks))
