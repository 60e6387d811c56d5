"""Twelve training steps against ``torch.optim.AdamW`` + ``CosineAnnealingLR``.

The fixture ``torch-reference/adamw_cosine.npz`` (made by
``tests/fixtures/make_fixtures.py``) holds a PAEFF model before training, its
data, and what PyTorch did with it: 4 epochs of 3 fixed batches, the cosine
schedule stepped once per epoch (as ``paeff_np.run.training`` steps it), the real
gradients of the whole loss, float64. Here ``paeff_np`` replays the same
steps with ``loss_and_grads``, ``AdamW`` and ``cosine_lr``.

Tolerance. Each step's gradients agree with PyTorch's to ~1e-14 relative
(the forward/backward reference cases); AdamW divides m̂ by √v̂, so a relative
error of the gradient stays a relative error of the same size in the update,
and over 12 steps (lr ≤ 1e-2) the measured worst difference of the losses
(1.4e-16), learning rates (1.7e-16), parameters, buffers and AdamW's m and
v is 2.5e-15 relative (``final_v`` of the conv weight). ``RTOL = 1e-13``
keeps a 40× margin, while real mistakes move some parameter far more: the
schedule one epoch late 0.17, ``eta_min`` ignored 0.03, weight decay left
out 1e-3 (relative error of the worst parameter, measured).

Rounding noise. The bias of a Linear that feeds a train-mode BatchNorm has
an exact zero gradient, which both sides compute as noise of ~1e-16 (below
``NOISE_GRAD`` = 1e-15, checked here on our side). Adam turns it into a step
of at most ``lr·|m̂|/ε ≤ lr·NOISE_GRAD/ε`` (ε = 1e-8, √v̂ ≪ ε), so these
biases and the running means they shift differ by at most twice that,
summed over the steps (1.6e-8; measured 3.7e-10), and are compared
absolutely. Their weight decay, 1e-4 of the bias a step, is well above it.
"""
import json
import os

import numpy as np
import pytest

import paeff_np as pn
from paeff_np.backend import to_host
from paeff_np.flat import flatten
from paeff_np.gradcheck import relative_error
from paeff_np.model import batchnorm_prefixes

FIXTURES = os.environ.get("PAEFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "fixtures", "torch-reference"))
CASE = "adamw_cosine"
RTOL = 1e-13
NOISE_GRAD = 1e-15        # bound on a zero gradient computed as rounding noise (either side)


def load_case():
    with open(os.path.join(FIXTURES, CASE + ".json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(FIXTURES, meta["file"]), allow_pickle=False)


def group(data, prefix):
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def replay(xp, meta, data, flat):
    """The steps of ``make_fixtures.make_adamw_case``, in paeff_np; as ``paeff_np.run.training`` runs them."""
    cfg, s, B = pn.Config(**meta["config"]), meta["optimizer"], meta["batch_size"]
    params = {k: xp.asarray(v) for k, v in group(data, "params/").items()}
    if flat:
        _, params = flatten(params)
    buffers = {k: xp.asarray(v) for k, v in group(data, "buffers/").items()}
    face, voice, labels = (xp.asarray(data[k]) for k in ("face", "voice", "labels"))
    opt = pn.AdamW(lr=s["lr"], betas=s["betas"], eps=s["eps"], weight_decay=s["weight_decay"])
    losses, lrs, noise_grad = [], [], 0.0
    pre_bn_biases = {p[:-2] + "0.bias" for p in batchnorm_prefixes(cfg)}
    for epoch in range(s["epochs"]):
        lr = pn.cosine_lr(epoch, s["lr"], s["epochs"], eta_min=s["eta_min"])
        for b in range(s["batches_per_epoch"]):
            rows = slice(b * B, (b + 1) * B)
            loss, _, grads, buffers = pn.loss_and_grads(params, buffers, face[rows], voice[rows],
                                                        labels[rows], cfg)
            noise_grad = max([noise_grad] + [float(xp.abs(grads[k]).max()) for k in pre_bn_biases])
            opt.step(params, grads, lr=lr)
            losses.append(float(loss))
            lrs.append(lr)
    return cfg, np.array(losses), np.array(lrs), params, buffers, opt, noise_grad


@pytest.mark.parametrize("flat", [False, True], ids=["per-key", "flat"])
def test_adamw_cosine_matches_pytorch(xp, flat):
    meta, data = load_case()
    s = meta["optimizer"]
    assert s["epochs"] * s["batches_per_epoch"] >= 10
    cfg, losses, lrs, params, buffers, opt, noise_grad = replay(xp, meta, data, flat)
    assert opt.t == len(data["losses"])
    assert noise_grad < NOISE_GRAD
    pre_bn_biases = {p[:-2] + "0.bias" for p in batchnorm_prefixes(cfg)}
    # each step moves a noise-gradient bias by at most lr·|m̂|/ε ≤ lr·NOISE_GRAD/ε, on either side
    noise_step = 2 * data["lrs"].sum() * NOISE_GRAD / s["eps"]
    errors = {"losses": relative_error(losses, data["losses"]),
              "lrs": relative_error(lrs, data["lrs"])}
    noise = {}
    for name, ours, theirs in [("final_params", params, group(data, "final_params/")),
                               ("final_m", opt.m, group(data, "final_m/")),
                               ("final_v", opt.v, group(data, "final_v/"))]:
        assert set(ours) == set(theirs)
        for k, v in theirs.items():
            if k in pre_bn_biases:
                noise[f"{name}/{k}"] = float(np.abs(to_host(ours[k]) - v).max())
            else:
                errors[f"{name}/{k}"] = relative_error(ours[k], v)
    final_buffers = group(data, "final_buffers/")
    assert set(buffers) == set(final_buffers)
    for k, v in final_buffers.items():
        if k.endswith("num_batches_tracked"):
            assert int(buffers[k]) == int(v) == len(losses)
        elif k.endswith("running_mean"):        # shifted by the noise-moved bias before it
            noise[f"final_buffers/{k}"] = float(np.abs(to_host(buffers[k]) - v).max())
        else:
            errors[f"final_buffers/{k}"] = relative_error(buffers[k], v)
    worst = max(errors, key=errors.get)
    assert errors[worst] < RTOL, (worst, errors[worst])
    worst_noise = max(noise, key=noise.get)
    assert noise[worst_noise] < noise_step, (worst_noise, noise[worst_noise], noise_step)


def test_case_is_a_real_trajectory():
    """The fixture is not trivial: the loss falls, the schedule decays, and every
    parameter (noise-gradient biases included, by weight decay) has moved."""
    meta, data = load_case()
    assert data["losses"][-3:].mean() < 0.8 * data["losses"][:3].mean()
    assert np.all(np.diff(data["lrs"]) <= 0) and data["lrs"][-1] < 0.5 * data["lrs"][0]
    for k, v in group(data, "params/").items():
        assert np.abs(data[f"final_params/{k}"] - v).max() > 1e-5, k
