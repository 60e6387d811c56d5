"""AdamW with PyTorch's semantics and the cosine learning-rate schedule (SPEC §4)."""
import math

from .backend import get_array_module, to_device, to_host


class AdamW:
    """Decoupled weight decay Adam (``torch.optim.AdamW``), on every parameter.

    For each step t = 1, 2, …::

        p ← p·(1 − lr·wd)
        m ← β₁m + (1 − β₁)g
        v ← β₂v + (1 − β₂)g²
        p ← p − lr · (m/(1 − β₁ᵗ)) / (√v/√(1 − β₂ᵗ) + ε)
    """

    def __init__(self, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0
        self.m = {}
        self.v = {}

    def step(self, params, grads, lr=None):
        """Update ``params`` in place from ``grads`` (dicts with the same keys)."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        bias1 = 1.0 - beta1 ** self.t
        sqrt_bias2 = math.sqrt(1.0 - beta2 ** self.t)
        for key, p in params.items():
            g = grads[key]
            if key not in self.m:
                xp = get_array_module(p)
                self.m[key] = xp.zeros_like(p)
                self.v[key] = xp.zeros_like(p)
            m, v = self.m[key], self.v[key]
            p *= 1.0 - lr * self.weight_decay
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            p -= (lr / bias1) * m / (get_array_module(v).sqrt(v) / sqrt_bias2 + self.eps)

    def state_dict(self):
        """Host arrays and numbers, ready for a checkpoint (no pickle needed)."""
        arrays = {f"m/{k}": to_host(v) for k, v in self.m.items()}
        arrays.update({f"v/{k}": to_host(v) for k, v in self.v.items()})
        meta = dict(t=self.t, lr=self.lr, betas=list(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)
        return meta, arrays

    def load_state_dict(self, meta, arrays, device="cpu"):
        self.t = int(meta["t"])
        self.lr, self.betas = meta["lr"], tuple(meta["betas"])
        self.eps, self.weight_decay = meta["eps"], meta["weight_decay"]
        own = lambda a: to_device(a, device).copy()     # never share memory with the source
        self.m = {k[2:]: own(a) for k, a in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: own(a) for k, a in arrays.items() if k.startswith("v/")}


def cosine_lr(epoch, base_lr, total_epochs, eta_min=1e-8):
    """``η_e = η_min + (η₀ − η_min)(1 + cos(π e/T))/2`` (``CosineAnnealingLR``,
    stepped once per epoch; epoch 0 gives ``η₀``)."""
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0
