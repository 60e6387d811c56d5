"""paeff_np: PAEFF face–voice association in NumPy (and CuPy), by hand.

The public contract::

    import paeff_np as pn
    cfg = pn.Config()                                   # PAEFF defaults
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    loss, terms, grads, buffers = pn.loss_and_grads(params, buffers, face, voice, labels, cfg, rng)
    face_emb, voice_emb = pn.embed(params, buffers, face, voice, cfg)
    opt = pn.AdamW(lr=2e-5); opt.step(params, grads)
    lr = pn.cosine_lr(epoch, base_lr, total_epochs)
"""
from .startup import interrupts_in_one_line

interrupts_in_one_line()         # a command's Ctrl-C during the imports below: one line
from .gradcheck import GradientCheckError, assert_gradients_ok, check_layer, check_op, gradcheck  # noqa: E402
from .model import Config, embed, init_params, loss_and_grads  # noqa: E402
from .optim import AdamW, cosine_lr  # noqa: E402

__all__ = ["Config", "init_params", "loss_and_grads", "embed", "AdamW", "cosine_lr",
           "gradcheck", "check_op", "check_layer", "assert_gradients_ok", "GradientCheckError"]
__version__ = "0.1.0"
