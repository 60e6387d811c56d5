#!/usr/bin/env python
"""Benchmark of the PAEFF training step: ms per step, samples/s, FLOP/s, and
the ratio to one large matrix product measured in the same run on the same
device.

    python bench.py [--device cpu|cuda|all] [--repeats N] [--quick] [--e2e] [--json PATH]

A "step" is ``loss_and_grads`` + ``AdamW.step`` on float32, with the parameters
in one flat buffer (``paeff_np.flat``), as the training loop runs it. Every
time quoted is a median over repeats after warm-up, each repeat synchronised
(CuPy: ``Device().synchronize()``) before the timer is read.

FLOPs of one step are counted from the shapes (``step_flops``): 2·m·n·k for
every matrix product of the forward and of the backward pass (the Linear
layers' ``x Wᵀ``, ``dW = dyᵀ x`` and ``dx = dy W`` — no ``dx`` for the two
layers that read the data —, the alignment's ``S = p_f p_vᵀ`` and its two
gradient products, the OPL Gram matrix ``ẑ ẑᵀ`` and ``(dG + dGᵀ) ẑ``).
Elementwise work (activations, normalisations, softmax, the 1-D conv of EGFF,
AdamW) is not counted: the achieved FLOP/s is that of the matrix products
averaged over the whole step, and the ratio to one large product says how
much of the device's matrix throughput the step turns into progress.

On a machine that sets OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (these sandboxes
do on some processors) NumPy's products run about twice slower than on a
user's machine; benchmark with both unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench.py
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paeff_np as pn                                    # noqa: E402
from paeff_np.backend import default_rng                 # noqa: E402
from paeff_np.atomic import write_json                  # noqa: E402
from paeff_np.flat import flatten                        # noqa: E402

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MAIN = dict(batch=1024, embed_dim=256, face_dim=4096, voice_dim=512, n_classes=901)
SCALING_B = (256, 1024, 4096)
SCALING_D = (128, 256, 512)
PAPER = dict(epochs=50, batch=1024, embed_dim=256, lr=2e-5)
VOXCELEB1 = dict(n_identities=1251, unseen_fraction=350 / 1251, pairs_per_video=33)
# 901 training identities x (6 - 1 held-out) videos on average x 33 pairs ~ 149k pairs


# --- FLOPs ---------------------------------------------------------------------

def step_flops(cfg, B):
    """``(total, rows)``: the FLOPs of one training step's matrix products,
    ``rows`` = ``[(name, m, n, k, flops)]`` with flops = 2·m·n·k."""
    D, rows = cfg.embed_dim, []

    def product(name, m, n, k):
        rows.append((name, m, n, k, 2 * m * n * k))

    def linear(name, n_in, n_out, need_dx=True):
        product(f"{name} forward x·Wᵀ", B, n_out, n_in)
        product(f"{name} dW = dyᵀ·x", n_out, n_in, B)
        if need_dx:
            product(f"{name} dx = dy·W", B, n_in, n_out)

    for branch, n_in in (("face", cfg.face_dim), ("voice", cfg.voice_dim)):
        linear(f"{branch}.fc1.0", n_in, D, need_dx=False)
        linear(f"{branch}.fc1.4", D, D)
    if cfg.alignment != "none":
        product("align S = p_f·p_vᵀ", B, B, D)
        product("align dp_f = dS·p_v", B, D, B)
        product("align dp_v = dSᵀ·p_f", B, D, B)
    if cfg.fusion == "gated":
        linear("gated.attention.0", 2 * D, 128)
        linear("gated.attention.1", 128, D)
    linear("res_mix", D, D)
    linear("logits", D, cfg.n_classes)
    product("opl G = ẑ·ẑᵀ", B, B, D)
    product("opl dẑ = (dG+dGᵀ)·ẑ", B, D, B)
    return sum(r[-1] for r in rows), rows


# --- devices and timing --------------------------------------------------------------

class Device:
    """The array module of one device and how to wait for it."""

    def __init__(self, name):
        self.name = name
        if name == "cpu":
            self.xp, self.label = np, "cpu (NumPy)"
            self.sync = lambda: None
        else:
            import cupy
            self.xp = cupy
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            self.label = f"cuda (CuPy {cupy.__version__} eager, {gpu})"
            self.sync = lambda: cupy.cuda.Device().synchronize()


def cupy_available():
    """``(True, "")`` when CuPy imports and sees a device, else ``(False, why)``."""
    try:
        import cupy
    except Exception as exc:
        return False, f"CuPy is not installed ({type(exc).__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy sees no CUDA device ({exc})"
    return (n > 0), ("" if n > 0 else "CuPy sees no CUDA device")


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


def make_step(dev, B, D, face_dim, voice_dim, K, seed=0):
    """A training step on random data of these sizes; returns ``(step, parts)``
    where ``parts`` collects the (fwd+bwd, AdamW) seconds of each call."""
    xp = dev.xp
    cfg = pn.Config(face_dim=face_dim, voice_dim=voice_dim, embed_dim=D, n_classes=K)
    params, buffers = pn.init_params(cfg, seed=seed, dtype=np.float32)
    _, params = flatten({k: xp.asarray(v) for k, v in params.items()})
    state = {"buffers": {k: xp.asarray(v) for k, v in buffers.items()}}
    host = np.random.default_rng(seed)
    face = xp.asarray(np.abs(host.standard_normal((B, face_dim), dtype=np.float32)))
    voice = xp.asarray(host.standard_normal((B, voice_dim), dtype=np.float32))
    labels = xp.asarray(host.integers(0, K, B))
    rng = default_rng(seed, xp)
    opt = pn.AdamW(lr=PAPER["lr"])
    parts = []

    def step():
        t0 = time.perf_counter()
        _, _, grads, state["buffers"] = pn.loss_and_grads(
            params, state["buffers"], face, voice, labels, cfg, rng=rng)
        dev.sync()
        t1 = time.perf_counter()
        opt.step(params, grads)
        dev.sync()
        parts.append((t1 - t0, time.perf_counter() - t1))
    return cfg, step, parts, (params, opt)


def bench_case(dev, B, D, face_dim, voice_dim, K, repeats, warmup, peak_flops, budget_s=None):
    cfg, step, parts, _ = make_step(dev, B, D, face_dim, voice_dim, K)
    times = timed(step, dev.sync, repeats, warmup, budget_s)
    parts = parts[warmup:]
    sec = statistics.median(times)
    flops, rows = step_flops(cfg, B)
    achieved = flops / sec
    return dict(batch=B, embed_dim=D, face_dim=face_dim, voice_dim=voice_dim, n_classes=K,
                n=len(times), ms_per_step=1e3 * sec, ms_min=1e3 * min(times),
                ms_q1=1e3 * _quantile(times, 0.25), ms_q3=1e3 * _quantile(times, 0.75),
                ms_fwd_bwd=1e3 * statistics.median(p[0] for p in parts),
                ms_adamw=1e3 * statistics.median(p[1] for p in parts),
                samples_per_s=B / sec, flops_per_step=flops, gflops=achieved / 1e9,
                ratio=achieved / peak_flops, flop_rows=rows)


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
        opt = pn.AdamW(lr=PAPER["lr"])
        out[name] = 1e3 * statistics.median(timed(lambda: opt.step(p, grads), dev.sync, repeats, 3))
    out["n_params"] = int(sum(v.size for v in params.values()))
    return out


# --- end to end --------------------------------------------------------------------

def end_to_end(dev_name, epochs_to_run, log):
    """The paper recipe on a VoxCeleb1-size synthetic set, through ``Trainer``."""
    from paeff_np.data.synth import make_synthetic
    from paeff_np.evaluation import evaluate
    from paeff_np.training import Trainer, TrainSettings

    t0 = time.perf_counter()
    dataset = make_synthetic(seed=0, **VOXCELEB1)
    gen_s = time.perf_counter() - t0
    train = dataset.train
    size_gb = (train.face.nbytes + train.voice.nbytes) / 1e9
    log(f"  synthetic VoxCeleb1-size set: {len(train):,} training pairs, {train.n_classes} identities, "
        f"{len(dataset.tests)} test lists; {size_gb:.1f} GB of features, generated in {gen_s:.1f} s")
    cfg = pn.Config(face_dim=train.face_dim, voice_dim=train.voice_dim,
                    embed_dim=PAPER["embed_dim"], n_classes=train.n_classes)
    settings = TrainSettings(epochs=PAPER["epochs"], lr=PAPER["lr"], batch_size=PAPER["batch"],
                             device=dev_name)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(dataset, cfg, settings, out, log=lambda s: None)
        t0 = time.perf_counter()
        records = trainer.train(stop_after=epochs_to_run)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate(trainer.params, trainer.buffers, cfg, dataset.tests, seed=0)
        eval_s = time.perf_counter() - t0
    loop_s = [r["seconds"] for r in records]
    per_epoch = train_s / len(records)                 # loop + monitor EER + checkpoint
    total = per_epoch * PAPER["epochs"] + eval_s
    return dict(device=dev_name, pairs=len(train), identities=train.n_classes,
                generate_s=gen_s, epochs_run=len(records), estimated=len(records) < PAPER["epochs"],
                epoch_s=per_epoch, epoch_loop_s=statistics.median(loop_s),
                samples_per_s=statistics.median(r["samples_per_s"] for r in records),
                final_eval_s=eval_s, total_50_epochs_s=total)


# --- report ------------------------------------------------------------------------

def cpu_busy(seconds=1.0):
    """Fraction of all CPUs busy over ``seconds`` (Linux ``/proc/stat``; None elsewhere):
    sampled before the run, it is the load of other processes."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]                 # total, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except OSError:
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def environment():
    info = dict(python=platform.python_version(), numpy=np.__version__,
                machine=f"{platform.system()} {platform.machine()}", cpus=os.cpu_count(),
                loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                cpu_busy_before=cpu_busy(),
                openblas_env={k: os.environ.get(k) for k in OPENBLAS_VARS}, blas=[])
    try:
        import scipy.special  # noqa: F401  (loaded by the step anyway: list its BLAS too)
        import threadpoolctl
        for lib in threadpoolctl.threadpool_info():
            info["blas"].append({k: lib.get(k) for k in (
                "user_api", "internal_api", "version", "architecture", "num_threads",
                "threading_layer", "filepath")})
    except ImportError:
        info["blas"] = None
    return info


def print_environment(env, log):
    load = env["loadavg"]
    log(f"Python {env['python']}, NumPy {env['numpy']}, {env['machine']}, {env['cpus']} CPUs"
        + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""))
    if env["blas"] is None:
        log("BLAS: threadpoolctl is not installed (it comes with scikit-learn)")
    for lib in env["blas"] or []:
        where = os.path.basename(lib["filepath"] or "")
        owner = "numpy" if "numpy" in (lib["filepath"] or "") else "scipy" if "scipy" in (lib["filepath"] or "") else "?"
        log(f"BLAS ({owner}): {lib['internal_api']} {lib['version']}, kernel {lib['architecture']}, "
            f"{lib['num_threads']} threads ({lib['threading_layer']}), {where}")
    set_vars = {k: v for k, v in env["openblas_env"].items() if v is not None}
    log(", ".join(f"{k}={v!r}" if v is not None else f"{k} unset"
                  for k, v in env["openblas_env"].items()))
    if set_vars:
        log("WARNING: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set: numbers are ~2x slower than on a "
            "user's machine (run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench.py)")
    busy = env["cpu_busy_before"]
    if busy is not None:
        log(f"CPU busy over 1 s before the run (other processes): {100 * busy:.0f}%")
        if busy > 0.1:
            log("WARNING: other processes use the CPUs: the figures below will be low and noisy "
                "(a busy core slows OpenBLAS's threads most)")


def flop_table(rows, log):
    log("  FLOPs counted (2·m·n·k per matrix product; elementwise work not counted):")
    for name, m, n, k, f in rows:
        log(f"    {name:<26} {m:>5} x {n:>5} x {k:>5}  {f / 1e9:7.3f} GFLOP")


def run_device(dev, args, log):
    quick = args.quick
    log(f"\n== {dev.label} ==")
    n_ref = 2048 if quick else 4096
    ref_repeats = 3 if quick else 7
    ref_times = matmul_reference(dev, n_ref, ref_repeats)
    ref_flops = 2 * n_ref ** 3

    def peak():
        return ref_flops / statistics.median(ref_times)
    log(f"large matmul {n_ref}x{n_ref}x{n_ref} float32: {peak() / 1e9:.1f} GFLOP/s "
        f"(median of {len(ref_times)}: {1e3 * statistics.median(ref_times):.1f} ms)")

    repeats = args.repeats or (5 if quick else 30)
    warmup = 1 if quick else 3
    B = 256 if quick else MAIN["batch"]
    main = bench_case(dev, B, MAIN["embed_dim"], MAIN["face_dim"], MAIN["voice_dim"],
                      MAIN["n_classes"], repeats, warmup, peak())
    scaling = []
    for b in ((256,) if quick else SCALING_B):
        for d in SCALING_D:
            scaling.append(bench_case(dev, b, d, MAIN["face_dim"], MAIN["voice_dim"], MAIN["n_classes"],
                                      repeats, 1 if quick else 2, peak(),
                                      budget_s=2.0 if quick else 8.0))
    adamw = adamw_compare(dev, 5 if quick else 20)
    ref_times += matmul_reference(dev, n_ref, ref_repeats)          # again, after the cases
    for case in [main] + scaling:                                  # one reference for all rows
        case["ratio"] = case["gflops"] * 1e9 / peak()

    log(f"large matmul again after the cases; median of all {len(ref_times)}: "
        f"{peak() / 1e9:.1f} GFLOP/s (min..max {ref_flops / max(ref_times) / 1e9:.0f}.."
        f"{ref_flops / min(ref_times) / 1e9:.0f})")
    log(f"\nmain case: B={main['batch']}, D={main['embed_dim']}, face {MAIN['face_dim']} / voice "
        f"{MAIN['voice_dim']}, K={MAIN['n_classes']}, PAEFF defaults (egff, hyperbolic, dropout 0.4), "
        f"float32, flat parameters")
    log(f"  step (loss_and_grads + AdamW): {main['ms_per_step']:.1f} ms median of {main['n']} "
        f"(IQR {main['ms_q1']:.1f}..{main['ms_q3']:.1f}, min {main['ms_min']:.1f}); "
        f"fwd+bwd {main['ms_fwd_bwd']:.1f} ms, AdamW {main['ms_adamw']:.2f} ms")
    log(f"  samples/s: {main['samples_per_s']:,.0f}")
    log(f"  FLOPs per step: {main['flops_per_step'] / 1e9:.2f} GFLOP (matrix products only)")
    flop_table(main["flop_rows"], log)
    log(f"  achieved: {main['gflops']:.1f} GFLOP/s")
    log(f"  ratio to large matmul: {main['ratio']:.2f} ({main['gflops']:.1f} / {peak() / 1e9:.1f} GFLOP/s)")
    log(f"  AdamW alone ({adamw['n_params']:,} parameters): per-key dicts {adamw['per_key']:.2f} ms, "
        f"flat buffer {adamw['flat']:.2f} ms")
    if dev.name == "cuda":
        log("  graph capture (CUDA graphs): not implemented yet")

    log("\nscaling (medians; ratio = step GFLOP/s / large matmul GFLOP/s):")
    log(f"  {'B':>5} {'D':>4} {'ms/step':>9} {'samples/s':>10} {'GFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'ratio':>6} {'n':>3}")
    for c in scaling:
        log(f"  {c['batch']:>5} {c['embed_dim']:>4} {c['ms_per_step']:>9.1f} {c['samples_per_s']:>10,.0f} "
            f"{c['flops_per_step'] / 1e9:>10.2f} {c['gflops']:>8.1f} {c['ratio']:>6.2f} {c['n']:>3}")
    if dev.name == "cuda":
        log("  graph capture: not implemented yet (no rows)")
    for case in [main] + scaling:
        case["flop_rows"] = [dict(name=r[0], m=r[1], n=r[2], k=r[3], flops=r[4])
                             for r in case["flop_rows"]]
    return dict(device=dev.name, label=dev.label,
                matmul=dict(n=n_ref, gflops=peak() / 1e9, ms_median=1e3 * statistics.median(ref_times),
                            samples=len(ref_times)),
                main=main, scaling=scaling, adamw_ms=adamw,
                graph_capture="not implemented yet" if dev.name == "cuda" else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu (NumPy), cuda (CuPy eager) or all that are present (default)")
    parser.add_argument("--repeats", type=int, help="timed steps per case (default 30; --quick 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a few repeats and only B=256 rows (a smoke test)")
    parser.add_argument("--e2e", action="store_true",
                        help="end-to-end time of the paper recipe (50 epochs, B=1024, D=256, lr 2e-5) "
                             "on a VoxCeleb1-size synthetic set, evaluation included")
    parser.add_argument("--e2e-epochs", type=int,
                        help="epochs actually run for --e2e (default: 1 on the CPU, where the 50-epoch "
                             "total is then estimated; 50 on CUDA)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH (atomically)")
    args = parser.parse_args(argv)
    log = lambda s="": print(s, flush=True)

    env = environment()
    print_environment(env, log)
    has_cupy, why = cupy_available()
    names = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if has_cupy else [])}[args.device]
    if args.device == "cuda" and not has_cupy:
        log(f"--device cuda: {why}")
        return 2
    if not has_cupy:
        log(f"CuPy rows skipped: {why}")

    results = dict(environment=env, devices=[], e2e=[])
    with np.errstate(all="ignore"):
        for name in names:
            results["devices"].append(run_device(Device(name), args, log))
        if args.e2e:
            for name in names:
                epochs = args.e2e_epochs or (1 if name == "cpu" else PAPER["epochs"])
                epochs = min(epochs, PAPER["epochs"])
                log(f"\n== end to end on {name}: paper recipe ({PAPER['epochs']} epochs, B={PAPER['batch']}, "
                    f"D={PAPER['embed_dim']}, lr {PAPER['lr']:g}), {epochs} epoch(s) run ==")
                r = end_to_end(name, epochs, log)
                results["e2e"].append(r)
                tag = "ESTIMATED (measured epochs x 50)" if r["estimated"] else "measured"
                log(f"  epoch: {r['epoch_s']:.1f} s (training loop {r['epoch_loop_s']:.1f} s, "
                    f"{r['samples_per_s']:,.0f} samples/s; the rest is the per-epoch EER monitor and checkpoint)")
                log(f"  final evaluation (all test lists): {r['final_eval_s']:.1f} s")
                log(f"  50 epochs + evaluation: {r['total_50_epochs_s']:.0f} s = "
                    f"{r['total_50_epochs_s'] / 3600:.2f} h, {tag}")
    if args.json:
        write_json(args.json, results)
        log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
