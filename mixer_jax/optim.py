"""Optax optimizers and learning-rate schedules from the config.

The chain is: global-norm clipping -> AdamW or SGD with momentum. Both decay the weights whose
"/"-joined name matches `optim.wd_regex` decoupled from the gradient (Loshchilov & Hutter): the
decay joins the update after Adam's moments or the momentum, and is scaled by the learning rate.
The schedule warms up linearly from 0 to `lr` over `warmup_steps`, then decays to `lr * lr_end` at
`total_steps` by a cosine or a line, or stays constant.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    lr, warmup, total = config.lr, config.warmup_steps, config.total_steps
    end = lr * config.lr_end
    decay_steps = max(total - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.lr_end)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def path_name(path: tuple) -> str:
    """A pytree key path as the official "/"-joined parameter name, e.g. `head/kernel`."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def regex_mask(params: Any, regex: str) -> Any:
    """A tree of bools: True where the parameter's full name matches `regex`."""
    pattern = re.compile(regex)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.fullmatch(path_name(p))), params)


def make(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = schedule(config)
    o = config.optim
    state_dtype = jnp.dtype(o.state_dtype)  # Momentum (and Adam's first moment) storage.
    if o.name == "adamw":
        core = optax.adamw(
            sched,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=config.wd,
            mu_dtype=state_dtype,
            mask=lambda params: regex_mask(params, o.wd_regex),
        )
    else:  # optax.sgd, with the decay between the momentum and the learning rate, as in AdamW.
        decay = (
            optax.add_decayed_weights(config.wd, mask=lambda params: regex_mask(params, o.wd_regex))
            if config.wd
            else optax.identity()
        )
        # The state keeps the layout of `chain(decay, optax.sgd)`, the coupled decay that runs written
        # before hold, so their checkpoints resume: the first place keeps the decay's (empty) state.
        core = optax.chain(
            optax.GradientTransformation(decay.init, lambda updates, state, params=None: (updates, state)),
            optax.chain(
                optax.trace(decay=o.momentum, accumulator_dtype=state_dtype) if o.momentum else optax.identity(),
                _then(decay, optax.scale_by_learning_rate(sched)),
            ),
        )
    if config.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core)
    return core, sched


def _then(
    stateless: optax.GradientTransformation, transform: optax.GradientTransformation
) -> optax.GradientTransformation:
    """`stateless` then `transform`, as one transformation with `transform`'s state alone."""

    def update(updates, state, params=None):
        updates, _ = stateless.update(updates, stateless.init(params), params)
        return transform.update(updates, state, params)

    return optax.GradientTransformation(transform.init, update)
