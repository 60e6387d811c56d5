#!/usr/bin/env python
"""The speed tricks of the math, each timed against its plain form: in one
process, in turn, median of ``--repeats`` calls (docs/perf.md records the
figures). Float32, B = 1024, D = 256, K = 901, as in bench.py's main case.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/perf_tricks.py
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paeff_np import backend, layers, losses   # noqa: E402

B, D, K = 1024, 256, 901


def in_turn(cases, repeats):
    """``{name: median ms}``, the cases called one after the other, ``repeats`` rounds."""
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def sigmoid_where(x):
    t = np.exp(-np.abs(x))
    return np.where(x >= 0, np.float32(1.0), t) / (1.0 + t)


def shared_exp(S):                      # the symmetric CE's one exponential and its sums
    E = np.exp(S - S.max())
    return E.sum(axis=1), E.sum(axis=0)


def two_exp(S):                         # its plain form: each row and each column by its own max
    rows, cols = np.exp(S - S.max(axis=1, keepdims=True)), np.exp(S - S.max(axis=0))
    return rows.sum(axis=1), cols.sum(axis=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    repeats = parser.parse_args().repeats
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, D)).astype(np.float32)
    w = rng.standard_normal((B, D)).astype(np.float32)
    unit = np.linspace(-1, 1, B * D, dtype=np.float32).reshape(B, D)
    S = (3 * rng.standard_normal((B, B))).astype(np.float32)
    labels = rng.integers(0, K, B)
    rows = {
        "sigmoid: where(x ≥ 0, 1, t)/(1 + t) | max(t, [x ≥ 0])/(1 + t)":
            {"plain": lambda: sigmoid_where(x), "fast": lambda: layers.sigmoid_forward(x)},
        "same-label pairs, 901 classes: B × B mask | sorted groups":
            {"plain": lambda: losses.same_label_pairs_plain(labels), "fast": lambda: losses.same_label_pairs(labels)},
        "symmetric CE exponentials, B × B: two | one shared":
            {"plain": lambda: two_exp(S), "fast": lambda: shared_exp(S)},
        "Φ of float32 unit rows: SciPy's ndtr | the series":
            {"plain": lambda: backend.ndtr(unit), "fast": lambda: layers.normal_cdf(unit)},
        "row dot products: (x * y).sum(axis=1) | einsum":
            {"plain": lambda: (x * w).sum(axis=1), "fast": lambda: layers.row_dot(x, w)},
        "OPL's G: ẑ @ ẑ.T (syrk) | ẑ @ ẑ.copy().T (gemm)":
            {"plain": lambda: x @ x.T, "fast": lambda: x @ x.copy().T},
    }
    for name, cases in rows.items():
        ms = in_turn(cases, repeats)
        print(f"{name:<68} {ms['plain']:8.3f} | {ms['fast']:8.3f} ms   {ms['plain'] / ms['fast']:5.2f}×",
              flush=True)


if __name__ == "__main__":
    main()
