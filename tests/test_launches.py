"""The launch count of a training step on CuPy, made on any machine through the
test double (tests/strict_xp.py, whose model of CuPy's calls is written down
there), and held from growing back.

The figures are the double's model of CuPy, not a GPU measurement: a GPU run
(.ci/gpu, bench.py --device cuda) is what says what a call costs.
"""
import os
import sys

import numpy as np
import pytest

import strict_xp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402

MAIN = (bench.MAIN["batch"], bench.MAIN["embed_dim"], bench.MAIN["face_dim"], bench.MAIN["voice_dim"],
        bench.MAIN["n_classes"])
# host calls of one step at the main sizes, by the counter: lower them here when the code
# gets cheaper, never raise them (the targets: <= 120 PAEFF, <= 150 Poincaré)
CEILINGS = {"hyperbolic": 98, "poincare": 105}
# the same through CUDA graphs (train.py --cuda-graphs: a replay of bench.make_graph_step):
# one call per graph segment, matrix product and random draw, plus the batch's indices
# and AdamW's numbers set before the replay
GRAPH_CEILINGS = {"hyperbolic": 45, "poincare": 45}
# every Config variant a step can take: fusion, alignment, EGFF's gate/mix/kernel, the
# Riemannian scaling, dropout on and off
VARIANTS = ([dict(fusion=f, alignment=a) for f in ("egff", "gated")
             for a in ("hyperbolic", "euclidean", "none", "poincare")]
            + [dict(egff_gate=g) for g in ("sum", "concat")]
            + [dict(egff_mix="raw"), dict(egff_kernel=5), dict(riemannian_grad=False), dict(dropout=0.0),
               dict(alignment="poincare", riemannian_grad=False)])


@pytest.fixture
def cupy(monkeypatch):
    return strict_xp.install(monkeypatch)


def test_the_counter_applies_cupys_rules(cupy):
    """One call of each kind, counted as the model in strict_xp says."""
    a = cupy.asarray(np.arange(1000.0).reshape(100, 10))                      # outside: not counted
    with strict_xp.counting() as c:
        b = a + 1.0                                                             # 1 elementwise
        a.sum()                                                                 # whole array: CUB, 2 kernels
        a.sum(axis=0)                                                           # 1 kernel
        a @ a.T                                                                 # 1 cuBLAS
        i = cupy.arange(5)                                                      # 1 elementwise
        a[i, i]                                                                 # 2 index arrays: 4
        a[i]                                                                    # 1 index array: 1 take
        a[2:5].T[1], a.reshape(-1)[::2], cupy.empty(3)                         # views: nothing
        b[0] = a[1]                                                             # a device copy
        cupy.asarray(np.ones(3))                                                # host → device
        value = float(a[0, 0])                                                  # a sync
    assert value == 0.0
    assert c.by_kind() == {"elementwise": 2, "reduction": 2, "cublas": 1, "fancy-index": 5, "copy": 1,
                           "h2d": 1}
    assert c.host_calls() == 12 and c.kernels() == 12
    assert len(c.syncs()) == 1 and "test_launches.py" in c.syncs()[0] and "float()" in c.syncs()[0]
    assert c.by_module() == {"test_launches.py": 12}


def test_a_boolean_mask_is_a_sync(cupy):
    a = cupy.asarray(np.arange(6.0))
    with strict_xp.counting() as c:
        a[a > 2]
    assert len(c.syncs()) == 1


@pytest.mark.parametrize("alignment", sorted(CEILINGS))
def test_a_training_step_costs_no_more_calls_than_recorded(cupy, alignment):
    """PAEFF's step and the Poincaré step at B = 1024, D = 256: the host calls stay at
    or under the recorded figure, every call modelled (none of kind "unmodelled")."""
    with np.errstate(all="ignore"):
        count = bench.count_step(cupy, *MAIN, alignment=alignment)
    assert not [k for k in count.by_kind() if k.startswith("unmodelled")], count.by_kind()
    assert count.host_calls() <= CEILINGS[alignment], count.summary()
    assert count.syncs() == [] and count.h2d() == 0, count.summary()


@pytest.mark.parametrize("alignment", sorted(GRAPH_CEILINGS))
def test_a_replayed_step_costs_no_more_calls_than_recorded(cupy, alignment):
    """The step through CUDA graphs: at or under the recorded figure; no sync, one upload
    (AdamW's numbers). Each matrix product and draw is one call, the rest is graphs."""
    with np.errstate(all="ignore"):
        count = bench.count_step(cupy, *MAIN, cuda_graphs=True, alignment=alignment)
        eager = bench.count_step(cupy, *MAIN, alignment=alignment)
    kinds = count.by_kind()
    assert count.host_calls() <= GRAPH_CEILINGS[alignment], count.summary()
    assert count.syncs() == [] and count.h2d() == 1, count.summary()
    assert kinds["cublas"] == eager.by_kind()["cublas"] and "random" not in eager.by_kind()
    assert set(kinds) == {"graph", "cublas", "copy", "h2d"}, kinds
    assert kinds["graph"] == kinds["cublas"] + 1      # one segment around each cut


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_no_host_sync_and_no_upload_inside_a_step_of_any_variant(cupy, config):
    """Labels are checked when the data is loaded, OPL's M⁺ is a mask, the symmetric CE
    picks its shift and the projection its rows on the device: nothing is read back."""
    with np.errstate(all="ignore"):
        count = bench.count_step(cupy, 64, 16, 24, 12, 7, **config)
    assert count.syncs() == [] and count.h2d() == 0, count.summary()


def test_bench_prints_the_count_by_kind_and_module(capsys):
    assert bench.main(["--count-launches"]) == 0
    out = capsys.readouterr().out
    assert "host calls by kind:" in out and "host calls by module:" in out
    assert "cublas" in out and "losses" in out and "host syncs" in out
    assert "cupy" not in sys.modules or not hasattr(sys.modules["cupy"], "counting")   # undone
