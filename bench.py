#!/usr/bin/env python
"""Benchmark of the PAEFF training step: ms per step, samples/s, FLOP/s, and
the ratio to one large matrix product measured in the same run on the same
device.

    python bench.py [--device cpu|cuda|all] [--repeats N] [--quick] [--e2e] [--json PATH]
    python bench.py --count-launches [--json PATH]

``--count-launches`` times nothing and needs no GPU: it runs one PAEFF step and
one Poincaré step at the main sizes (after a warm-up step) through the CuPy test
double of tests/strict_xp.py and prints what CuPy would launch for them, by
kind and by module, with every host sync and its source line (the model of
CuPy it applies is written down in that file).

A "step" is ``loss_and_grads`` + ``AdamW.step`` on float32, with the parameters
in one flat buffer (``paeff_np.flat``), as the training loop runs it. Every
time quoted is a median over repeats after warm-up, each repeat synchronised
(CuPy: ``Device().synchronize()``) before the timer is read.

FLOPs of one step are counted from the shapes (``paeff_np.model.step_flops``):
2·m·n·k for every matrix product of the forward and of the backward pass.
Elementwise work (activations, normalisations, softmax, the 1-D conv of EGFF,
AdamW) is not counted: the achieved FLOP/s is that of the matrix products
averaged over the whole step, and the ratio to one large product says how
much of the device's matrix throughput the step turns into progress.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, can pin OpenBLAS to a slower
kernel or block size; for figures comparable across machines benchmark with
both unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench.py

The environment (BLAS, CPU load, and on a GPU the CuPy, driver and runtime
versions, the device and CUPY_TF32) is printed first and kept in the JSON.
"""
import paeff_np  # noqa: F401  first: a Ctrl-C while the rest is imported is one line
import argparse
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paeff_np as pn                                    # noqa: E402
from paeff_np.run import envinfo                             # noqa: E402
from paeff_np.run.atomic import write_json                   # noqa: E402
from paeff_np.run.cli import check_can_write_file, describe_error, run  # noqa: E402
from paeff_np.usage import ArgumentParser, UsageError  # noqa: E402
from paeff_np.backend import CounterDropout, default_rng, keep_freed_memory, probe_gpu  # noqa: E402
from paeff_np.flat import flatten                        # noqa: E402
from paeff_np.model import step_flops, step_matmuls      # noqa: E402
from paeff_np.run.training import NO_SELECTION, PAPER_RECIPE, GraphedStep  # noqa: E402

MAIN = dict(batch=1024, embed_dim=256, face_dim=4096, voice_dim=512, n_classes=901)
SCALING_B = (256, 1024, 4096)
SCALING_D = (128, 256, 512)
VOXCELEB1 = dict(n_identities=1251, unseen_fraction=350 / 1251, pairs_per_video=33)
# 901 training identities x (6 - 1 held-out) videos on average x 33 pairs ~ 149k pairs


# --- devices and timing --------------------------------------------------------------

class Device:
    """The array module of one device and how to wait for it (``cupy``: a probed module)."""

    def __init__(self, name, cupy=None):
        self.name = name
        if name == "cpu":
            self.xp, self.label = np, "cpu (NumPy)"
            self.sync = lambda: None
        else:
            gpu = envinfo.cuda_info(cupy)["device_name"]
            self.xp, self.label = cupy, f"cuda (CuPy {cupy.__version__} eager, {gpu})"
            self.sync = lambda: cupy.cuda.Device().synchronize()


def timed(fn, sync, repeats, warmup, budget_s=None):
    """Seconds of each of ``repeats`` calls after ``warmup`` calls (each synchronised);
    stops early, with at least 3, once ``budget_s`` has passed."""
    for _ in range(warmup):
        fn()
        sync()
    times, start = [], time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return times


def matmul_reference(dev, n, repeats):
    """Seconds of each ``n × n @ n × n`` float32 product (median quoted)."""
    xp = dev.xp
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
    out = xp.empty((n, n), dtype=np.float32)
    return timed(lambda: xp.matmul(a, b, out=out), dev.sync, repeats, warmup=1)


def timed_alternating(fn_a, fn_b, sync, repeats, warmup):
    """Seconds of calls of ``fn_a`` and of ``fn_b`` taken in turn, so that both
    see the same machine state (a drift in the machine's speed hits both).

    Each timed call follows an untimed call of the same function (a, a*, b,
    b*, a, a*, ...; * timed), as in training, where a step follows a step: the
    other function's operands, tens of MB, would otherwise have pushed this
    one's out of the caches (on the 2-core test machine that added about 7 ms
    to the step)."""
    for _ in range(warmup):
        fn_a(), sync(), fn_b(), sync()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return times_a, times_b


def make_matmul_floor(dev, cfg, B, seed=0):
    """``floor()``: every matrix product of one step (``step_matmuls``) once,
    at its shapes and memory layouts, on random float32 operands. The step can
    be no faster than this; the ratio step / floor is the elementwise overhead."""
    xp, host = dev.xp, np.random.default_rng(seed)
    products = []
    for _, a_shape, b_shape, transpose_a, transpose_b in step_matmuls(cfg, B):
        a, b = (xp.asarray(host.standard_normal(shape, dtype=np.float32)) for shape in (a_shape, b_shape))
        products.append((a.T if transpose_a else a, b.T if transpose_b else b))
    return lambda: [x @ y for x, y in products]


def make_step(dev, B, D, face_dim, voice_dim, K, seed=0, alignment="hyperbolic", **config):
    """A training step on random data of these sizes: ``(cfg, step, parts)``,
    where ``step()`` runs one step and ``parts`` collects the (fwd+bwd, AdamW)
    seconds of each call; ``config``: further Config fields."""
    xp = dev.xp
    cfg = pn.Config(face_dim=face_dim, voice_dim=voice_dim, embed_dim=D, n_classes=K,
                    alignment=alignment, **config)
    params, buffers = pn.init_params(cfg, seed=seed, dtype=np.float32)
    _, params = flatten({k: xp.asarray(v) for k, v in params.items()})
    state = {"buffers": {k: xp.asarray(v) for k, v in buffers.items()}}
    host = np.random.default_rng(seed)
    face = xp.asarray(np.abs(host.standard_normal((B, face_dim), dtype=np.float32)))
    voice = xp.asarray(host.standard_normal((B, voice_dim), dtype=np.float32))
    labels = xp.asarray(host.integers(0, K, B))
    rng = default_rng(seed, xp)
    opt = pn.AdamW(lr=PAPER_RECIPE["lr"])
    parts = []

    def step():
        t0 = time.perf_counter()
        _, _, grads, state["buffers"] = pn.loss_and_grads(
            params, state["buffers"], face, voice, labels, cfg, rng=rng)
        dev.sync()
        t1 = time.perf_counter()
        opt.step(params, grads)
        if isinstance(rng, CounterDropout):     # CuPy's counter-based dropout: the next step's numbers
            rng.advance()
        dev.sync()
        parts.append((t1 - t0, time.perf_counter() - t1))
    return cfg, step, parts


def bench_case(dev, B, D, face_dim, voice_dim, K, repeats, warmup, peak_flops, budget_s=None,
               with_floor=False):
    """The step at these sizes: times (median, IQR, min), its two parts, FLOPs,
    ratio; ``with_floor``: also its matrix-product floor, timed in turn with it."""
    cfg, step, parts = make_step(dev, B, D, face_dim, voice_dim, K)
    floor_times = None
    if with_floor:
        times, floor_times = timed_alternating(step, make_matmul_floor(dev, cfg, B), dev.sync,
                                               repeats, warmup)
    else:
        times = timed(step, dev.sync, repeats, warmup, budget_s)
    parts = parts[warmup:]
    sec = statistics.median(times)
    flops, rows = step_flops(cfg, B)
    achieved = flops / sec
    case = dict(batch=B, embed_dim=D, face_dim=face_dim, voice_dim=voice_dim, n_classes=K,
                n=len(times), ms_per_step=1e3 * sec, ms_min=1e3 * min(times),
                ms_q1=1e3 * _quantile(times, 0.25), ms_q3=1e3 * _quantile(times, 0.75),
                ms_fwd_bwd=1e3 * statistics.median(p[0] for p in parts),
                ms_adamw=1e3 * statistics.median(p[1] for p in parts),
                samples_per_s=B / sec, flops_per_step=flops, gflops=achieved / 1e9,
                ratio=achieved / peak_flops, flop_rows=rows)
    if floor_times:
        floor = statistics.median(floor_times)
        case.update(ms_floor=1e3 * floor, step_over_floor=sec / floor)
    return case


def _quantile(values, q):
    return float(np.quantile(np.asarray(values), q))


def adamw_compare(dev, repeats):
    """Seconds of AdamW alone at the main size: per-key dicts vs the flat buffer."""
    xp = dev.xp
    cfg = pn.Config(embed_dim=MAIN["embed_dim"], face_dim=MAIN["face_dim"],
                    voice_dim=MAIN["voice_dim"], n_classes=MAIN["n_classes"])
    params, _ = pn.init_params(cfg, seed=0, dtype=np.float32)
    host = np.random.default_rng(0)
    grads = {k: xp.asarray(host.standard_normal(v.shape, dtype=np.float32) * 1e-3)
             for k, v in params.items()}
    plain = {k: xp.asarray(v) for k, v in params.items()}
    _, flat = flatten(plain)
    out = {}
    for name, p in (("per_key", plain), ("flat", flat)):
        opt = pn.AdamW(lr=PAPER_RECIPE["lr"])
        out[name] = 1e3 * statistics.median(timed(lambda: opt.step(p, grads), dev.sync, repeats, 3))
    out["n_params"] = int(sum(v.size for v in params.values()))
    return out


# --- launches, counted through the CuPy test double ------------------------------------

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")


def strict_double():
    """tests/strict_xp.py, the CuPy test double that counts launches."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import strict_xp
    return strict_xp


def make_graph_step(dev, B, D, face_dim, voice_dim, K, seed=0, alignment="hyperbolic", **config):
    """The step of ``make_step`` through CUDA graphs (``training.GraphedStep``, what
    ``train.py --cuda-graphs`` runs): ``step()`` trains on all B rows; the first call
    runs eagerly, the second records, the rest replay, on the graphs' own stream (the
    caller synchronizes before reading anything on the default stream)."""
    xp = dev.xp
    cfg = pn.Config(face_dim=face_dim, voice_dim=voice_dim, embed_dim=D, n_classes=K,
                    alignment=alignment, **config)
    params, buffers = pn.init_params(cfg, seed=seed, dtype=np.float32)
    _, params = flatten({k: xp.asarray(v) for k, v in params.items()})
    buffers = {k: xp.asarray(v) for k, v in buffers.items()}
    host = np.random.default_rng(seed)
    face = xp.asarray(np.abs(host.standard_normal((B, face_dim), dtype=np.float32)))
    voice = xp.asarray(host.standard_normal((B, voice_dim), dtype=np.float32))
    labels = xp.asarray(host.integers(0, K, B))
    graphed = GraphedStep(xp, params, buffers, pn.AdamW(lr=PAPER_RECIPE["lr"]), cfg, face, voice, labels, B,
                          rng=default_rng(seed, xp))
    rows = xp.arange(B)
    dev.xp.cuda.Device().synchronize()      # the graphs' stream does not wait for the default one
    return cfg, lambda: graphed(rows, PAPER_RECIPE["lr"])


def count_step(cupy, B, D, face_dim, voice_dim, K, cuda_graphs=False, **config):
    """The cost in CuPy calls of one training step (``loss_and_grads`` + AdamW on
    the flat buffer, as ``make_step`` runs it; ``cuda_graphs``: a replay of
    ``make_graph_step``), after the warm-up (and recording) calls, counted by the
    double ``cupy`` (``strict_xp.installed()``): a ``LaunchCount``."""
    double = sys.modules[type(cupy.asarray(np.zeros(1))).__module__]
    dev = types.SimpleNamespace(xp=cupy, sync=lambda: None)
    if cuda_graphs:
        _, step = make_graph_step(dev, B, D, face_dim, voice_dim, K, **config)
        step(), step()
    else:
        _, step, _ = make_step(dev, B, D, face_dim, voice_dim, K, **config)
        step()
    with double.counting() as count:
        step()
    if cuda_graphs:
        cupy.cuda.Device().synchronize()    # the replays ran on the graphs' own stream
    return count


def count_launches(log):
    """``--count-launches``: the PAEFF and the Poincaré step at the main sizes, eager
    and through CUDA graphs (``--cuda-graphs``)."""
    double = strict_double()
    sizes = (MAIN["batch"], MAIN["embed_dim"], MAIN["face_dim"], MAIN["voice_dim"], MAIN["n_classes"])
    results = {}
    with double.installed() as cupy, np.errstate(all="ignore"):
        for name, alignment in (("paeff", "hyperbolic"), ("poincare", "poincare")):
            results[name] = count_step(cupy, *sizes, alignment=alignment).summary()
            results[name + "_graphs"] = count_step(cupy, *sizes, cuda_graphs=True, alignment=alignment).summary()
    log(f"CuPy calls of one training step, counted through the test double (tests/strict_xp.py), "
        f"B={sizes[0]}, D={sizes[1]}, face {sizes[2]} / voice {sizes[3]}, K={sizes[4]}:")
    columns = (("paeff", "PAEFF"), ("poincare", "Poincaré"))
    kinds = sorted({k for r in results.values() for k in r["by_kind"]})
    modules = sorted({m for r in results.values() for m in r["by_module"]})
    log(f"  {'':<22} {'PAEFF':>8} {'Poincaré':>9}   with --cuda-graphs: {'PAEFF':>6} {'Poincaré':>9}")
    rows = [("host calls", "host_calls"), ("kernels", "kernels"), ("host syncs", "syncs"),
            ("host → device copies", "h2d")]

    def line(label, get):
        eager = "".join(f" {get(results[n]):>{w}}" for (n, _), w in zip(columns, (8, 9)))
        graphs = "".join(f" {get(results[n + '_graphs']):>{w}}" for (n, _), w in zip(columns, (6, 9)))
        log(f"  {label:<22}{eager}   {'':<19}{graphs}")
    for label, key in rows:
        line(label, lambda r: r[key])
    log("  host calls by kind:")
    for kind in kinds:
        line(f"  {kind}", lambda r: r["by_kind"].get(kind, 0))
    log("  host calls by module:")
    for module in modules:
        line(f"  {module}", lambda r: r["by_module"].get(module, 0))
    for name, r in results.items():
        for sync_line in r["sync_lines"]:
            log(f"  sync ({name}): {sync_line}")
    return results


# --- end to end --------------------------------------------------------------------

def end_to_end(dev_name, epochs_to_run, log):
    """The paper recipe on a VoxCeleb1-size synthetic set, through ``Trainer``."""
    from paeff_np.data.synth import make_synthetic
    from paeff_np.run.evaluation import evaluate
    from paeff_np.run.training import Trainer, TrainSettings

    t0 = time.perf_counter()
    dataset = make_synthetic(seed=0, **VOXCELEB1)
    gen_s = time.perf_counter() - t0
    train = dataset.train
    size_gb = (train.face.nbytes + train.voice.nbytes) / 1e9
    log(f"  synthetic VoxCeleb1-size set: {len(train):,} training pairs, {train.n_classes} identities, "
        f"{len(dataset.tests)} test lists; {size_gb:.1f} GB of features, generated in {gen_s:.1f} s")
    cfg = pn.Config(face_dim=train.face_dim, voice_dim=train.voice_dim,
                    embed_dim=PAPER_RECIPE["embed_dim"], n_classes=train.n_classes)
    settings = TrainSettings(epochs=PAPER_RECIPE["epochs"], lr=PAPER_RECIPE["lr"], batch_size=PAPER_RECIPE["batch_size"],
                             device=dev_name, **NO_SELECTION)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(dataset, cfg, settings, out, log=lambda s: None)
        t0 = time.perf_counter()
        records = trainer.train(stop_after=epochs_to_run)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate(trainer.params, trainer.buffers, cfg, dataset.tests, seed=0)
        eval_s = time.perf_counter() - t0
    loop_s = [r["seconds"] for r in records]
    per_epoch = train_s / len(records)                 # loop + checkpoint (no validation split here)
    total = per_epoch * PAPER_RECIPE["epochs"] + eval_s
    return dict(device=dev_name, pairs=len(train), identities=train.n_classes,
                generate_s=gen_s, epochs_run=len(records), estimated=len(records) < PAPER_RECIPE["epochs"],
                epoch_s=per_epoch, epoch_loop_s=statistics.median(loop_s),
                samples_per_s=statistics.median(r["samples_per_s"] for r in records),
                final_eval_s=eval_s, total_50_epochs_s=total)


# --- report ------------------------------------------------------------------------

def flop_table(rows, log):
    log("  FLOPs counted (2·m·n·k per matrix product; elementwise work not counted):")
    for name, m, n, k, f in rows:
        log(f"    {name:<32} {m:>5} x {n:>5} x {k:>5}  {f / 1e9:7.3f} GFLOP")


class ReferenceProduct:
    """One large ``n × n @ n × n`` float32 product, timed before and after the
    cases; its median FLOP/s is the yardstick of every ratio."""

    def __init__(self, dev, quick):
        self.dev, self.n, self.repeats = dev, (2048 if quick else 4096), (3 if quick else 7)
        self.flops = 2 * self.n ** 3
        self.times = matmul_reference(dev, self.n, self.repeats)

    def measure_again(self):
        self.times += matmul_reference(self.dev, self.n, self.repeats)

    def flops_per_s(self):
        return self.flops / statistics.median(self.times)

    def record(self):
        return dict(n=self.n, gflops=self.flops_per_s() / 1e9,
                    ms_median=1e3 * statistics.median(self.times), samples=len(self.times))


def compare_alignments(dev, B, repeats, warmup):
    """PAEFF's step (hyperbolic alignment) and the Poincaré-distance step at the
    main sizes, timed in turn: ``{ms_hyperbolic, ms_poincare, poincare_over_hyperbolic}``."""
    sizes = (B, MAIN["embed_dim"], MAIN["face_dim"], MAIN["voice_dim"], MAIN["n_classes"])
    _, hyperbolic, _ = make_step(dev, *sizes, alignment="hyperbolic")
    _, poincare, _ = make_step(dev, *sizes, alignment="poincare")
    times_h, times_p = timed_alternating(hyperbolic, poincare, dev.sync, repeats, warmup)
    ms_h, ms_p = 1e3 * statistics.median(times_h), 1e3 * statistics.median(times_p)
    return dict(batch=B, n=repeats, ms_hyperbolic=ms_h, ms_poincare=ms_p, poincare_over_hyperbolic=ms_p / ms_h)


def measure_cases(dev, args, peak_flops):
    """The main case, the B × D scaling rows and AdamW alone."""
    quick = args.quick
    repeats = (5 if quick else 30) if args.repeats is None else args.repeats
    sizes = dict(face_dim=MAIN["face_dim"], voice_dim=MAIN["voice_dim"], K=MAIN["n_classes"])
    main = bench_case(dev, 256 if quick else MAIN["batch"], MAIN["embed_dim"], repeats=repeats,
                      warmup=1 if quick else 3, peak_flops=peak_flops, with_floor=True, **sizes)
    scaling = [bench_case(dev, b, d, repeats=repeats, warmup=1 if quick else 2, peak_flops=peak_flops,
                          budget_s=2.0 if quick else 8.0, **sizes)
               for b in ((256,) if quick else SCALING_B) for d in SCALING_D]
    adamw = adamw_compare(dev, 5 if quick else 20)
    main["alignments"] = compare_alignments(dev, main["batch"], repeats=3 if quick else 15,
                                            warmup=1 if quick else 2)
    return main, scaling, adamw


def report_main(dev, main, adamw, ref, log):
    log(f"\nmain case: B={main['batch']}, D={main['embed_dim']}, face {MAIN['face_dim']} / voice "
        f"{MAIN['voice_dim']}, K={MAIN['n_classes']}, PAEFF defaults (egff, hyperbolic, dropout 0.4), "
        f"float32, flat parameters")
    log(f"  step (loss_and_grads + AdamW): {main['ms_per_step']:.1f} ms median of {main['n']} "
        f"(IQR {main['ms_q1']:.1f}..{main['ms_q3']:.1f}, min {main['ms_min']:.1f}); "
        f"fwd+bwd {main['ms_fwd_bwd']:.1f} ms, AdamW {main['ms_adamw']:.2f} ms")
    log(f"  samples/s: {main['samples_per_s']:,.0f}")
    log(f"  matrix-product floor (the step's {len(main['flop_rows'])} products alone, timed in turn "
        f"with it): {main['ms_floor']:.1f} ms; step / floor = {main['step_over_floor']:.2f}")
    log(f"  FLOPs per step: {main['flops_per_step'] / 1e9:.2f} GFLOP (matrix products only)")
    flop_table(main["flop_rows"], log)
    log(f"  achieved: {main['gflops']:.1f} GFLOP/s")
    log(f"  ratio to large matmul: {main['ratio']:.2f} ({main['gflops']:.1f} / "
        f"{ref.flops_per_s() / 1e9:.1f} GFLOP/s)")
    log(f"  AdamW alone ({adamw['n_params']:,} parameters): per-key dicts {adamw['per_key']:.2f} ms, "
        f"flat buffer {adamw['flat']:.2f} ms")
    a = main["alignments"]
    log(f"  alignment, the two steps timed in turn ({a['n']} each): PAEFF (hyperbolic) "
        f"{a['ms_hyperbolic']:.1f} ms, Poincaré distance {a['ms_poincare']:.1f} ms "
        f"= {a['poincare_over_hyperbolic']:.2f}x")
    if dev.name == "cuda":
        log("  CUDA-graph capture: not implemented yet")


def report_scaling(scaling, log):
    log("\nscaling (medians; ratio = step GFLOP/s / large matmul GFLOP/s):")
    log(f"  {'B':>5} {'D':>4} {'ms/step':>9} {'samples/s':>10} {'GFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'ratio':>6} {'n':>3}")
    for c in scaling:
        log(f"  {c['batch']:>5} {c['embed_dim']:>4} {c['ms_per_step']:>9.1f} {c['samples_per_s']:>10,.0f} "
            f"{c['flops_per_step'] / 1e9:>10.2f} {c['gflops']:>8.1f} {c['ratio']:>6.2f} {c['n']:>3}")


def run_device(dev, args, log):
    """One device: the reference product, the cases, the reference again
    (every ratio uses the median of both), the report; returns the figures."""
    log(f"\n== {dev.label} ==")
    ref = ReferenceProduct(dev, args.quick)
    log(f"large matmul {ref.n}x{ref.n}x{ref.n} float32: {ref.flops_per_s() / 1e9:.1f} GFLOP/s "
        f"(median of {len(ref.times)}: {1e3 * statistics.median(ref.times):.1f} ms)")
    main, scaling, adamw = measure_cases(dev, args, ref.flops_per_s())
    ref.measure_again()
    cases = [main] + scaling
    for case in cases:
        case["ratio"] = case["gflops"] * 1e9 / ref.flops_per_s()
    log(f"large matmul again after the cases; median of all {len(ref.times)}: "
        f"{ref.flops_per_s() / 1e9:.1f} GFLOP/s (min..max {ref.flops / max(ref.times) / 1e9:.0f}.."
        f"{ref.flops / min(ref.times) / 1e9:.0f})")
    report_main(dev, main, adamw, ref, log)
    report_scaling(scaling, log)
    for case in cases:
        case["flop_rows"] = [dict(name=r[0], m=r[1], n=r[2], k=r[3], flops=r[4]) for r in case["flop_rows"]]
    return dict(device=dev.name, label=dev.label, matmul=ref.record(), main=main, scaling=scaling,
                adamw_ms=adamw, graph_capture="not implemented yet" if dev.name == "cuda" else None)


def report_e2e(r, log):
    tag = f"ESTIMATED (measured epochs x {PAPER_RECIPE['epochs']})" if r["estimated"] else "measured"
    log(f"  epoch: {r['epoch_s']:.1f} s (training loop {r['epoch_loop_s']:.1f} s, "
        f"{r['samples_per_s']:,.0f} samples/s; the rest is the checkpoint; no validation split is carved here)")
    log(f"  final evaluation (all test lists): {r['final_eval_s']:.1f} s")
    log(f"  {PAPER_RECIPE['epochs']} epochs + evaluation: {r['total_50_epochs_s']:.0f} s = "
        f"{r['total_50_epochs_s'] / 3600:.2f} h, {tag}")


def devices_to_run(choice):
    """``(names, cupy, reason)``: the devices to time; the GPU probe runs only
    when a GPU may be used."""
    if choice == "cpu":
        return ["cpu"], None, None
    cupy, reason = probe_gpu()
    if choice == "cuda":
        return ["cuda"], cupy, reason
    return ["cpu"] + (["cuda"] if cupy is not None else []), cupy, reason


def parse_args(argv):
    parser = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu (NumPy), cuda (CuPy eager) or all that are present (default)")
    parser.add_argument("--repeats", type=int, help="timed steps per case, >= 1 (default 30; --quick 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a few repeats and only B=256 rows (a smoke test)")
    parser.add_argument("--e2e", action="store_true",
                        help=f"end-to-end time of the paper recipe ({PAPER_RECIPE['epochs']} epochs, "
                             f"B={PAPER_RECIPE['batch_size']}, D={PAPER_RECIPE['embed_dim']}, lr {PAPER_RECIPE['lr']:g}) "
                             f"on a VoxCeleb1-size synthetic set, evaluation included")
    parser.add_argument("--e2e-epochs", type=int,
                        help=f"epochs actually run for --e2e, 1..{PAPER_RECIPE['epochs']} (default: 1 on the "
                             f"CPU, where the total is then estimated; all of them on CUDA)")
    parser.add_argument("--count-launches", action="store_true",
                        help="time nothing: count what CuPy would launch for one PAEFF and one Poincaré "
                             "step, through the test double of tests/strict_xp.py (no GPU needed)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH (atomically)")
    return parser.parse_args(argv)


def check_args(args):
    """Refuse, before anything is timed, the flags the run would fail on (or quietly
    change) minutes later: UsageError, one line naming the flag."""
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be a whole number >= 1")
    epochs = PAPER_RECIPE["epochs"]
    if args.e2e_epochs is not None:
        if not 1 <= args.e2e_epochs <= epochs:
            raise UsageError(f"--e2e-epochs {args.e2e_epochs}: must be a whole number in 1..{epochs} "
                             f"(the paper recipe's epochs)")
        if not args.e2e:
            raise UsageError(f"--e2e-epochs {args.e2e_epochs} is for --e2e: add --e2e, or leave it out")
    if args.json is not None:
        check_can_write_file(args.json, "--json")


def bench(args):
    """The whole run, after ``run``'s ``prepare_process``: the checks, the environment,
    every device, the end to end, the JSON. A user error is raised (``run`` prints it)."""
    check_args(args)
    log = lambda s="": print(s, flush=True)
    if args.count_launches:
        results = dict(launches=count_launches(log))
        if args.json is not None:
            write_json(args.json, results)
            log(f"\nwrote {args.json}")
        return 0
    names, cupy, reason = devices_to_run(args.device)
    if "cuda" in names and cupy is None:
        raise UsageError(reason)
    env = envinfo.environment(cupy)
    env["keep_freed_memory"] = keep_freed_memory()     # prepare_process's answer (cached)
    for line in envinfo.summary_lines(env):
        log(line)
    if reason is not None and args.device == "all":
        log(f"CuPy rows skipped: {reason}")

    results = dict(environment=env, devices=[], e2e=[])
    with np.errstate(all="ignore"):
        for name in names:
            results["devices"].append(run_device(Device(name, cupy), args, log))
        if args.e2e:
            for name in names:
                default = 1 if name == "cpu" else PAPER_RECIPE["epochs"]
                epochs = default if args.e2e_epochs is None else args.e2e_epochs
                log(f"\n== end to end on {name}: paper recipe ({PAPER_RECIPE['epochs']} epochs, B={PAPER_RECIPE['batch_size']}, "
                    f"D={PAPER_RECIPE['embed_dim']}, lr {PAPER_RECIPE['lr']:g}), {epochs} epoch(s) run ==")
                results["e2e"].append(end_to_end(name, epochs, log))
                report_e2e(results["e2e"][-1], log)
    if args.json is not None:
        try:
            write_json(args.json, results)
        except OSError as exc:          # checked at the start, yet e.g. the disk filled up
            raise UsageError(f"{describe_error(exc)}; the figures are printed above but were not "
                             f"saved") from None
        log(f"\nwrote {args.json}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run(lambda: bench(args), "bench.py")


if __name__ == "__main__":
    sys.exit(main())
