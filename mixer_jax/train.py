"""The trainer: `train_and_evaluate(config, workdir)`, one file, read top to bottom.

mesh -> data -> model and optimizer shapes -> shardings -> sharded init (or resume) -> jitted,
donated train step -> loop with periodic evaluation, summaries and checkpoints -> final
evaluation and checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from mixer_jax import checkpointing, fewshot, models, optim, sharding, weights
from mixer_jax.data import pipeline, preprocess


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # Base key; step s uses fold_in(rng, s).


def create_model(config: ml_collections.ConfigDict) -> models.MlpMixer:
    m = config.model
    return models.create(
        m.variant,
        num_classes=m.num_classes,
        image_size=m.image_size,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        gelu_approximate=m.gelu_approximate,
        dropout_rate=m.dropout_rate,
        stoch_depth=m.stoch_depth,
        scan_blocks=m.scan_blocks,
        remat=m.remat,
        matmul_dtype=jnp.dtype(m.matmul_dtype) if m.matmul_dtype else None,
        matmuls=m.matmuls,
        gelu_backward=m.gelu_backward,
        layer_norm_backward=m.layer_norm_backward,
        **weights.finetune_overrides(m.variant, m.image_size, m.pretrain_image_size),
    )


def loss_fn(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example loss in float32. Softmax targets are normalised, so multi-hot labels work too."""
    logits = logits.astype(jnp.float32)
    if name == "sigmoid_xent":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
    labels = labels / jnp.maximum(labels.sum(-1, keepdims=True), 1e-9)
    return optax.softmax_cross_entropy(logits, labels)


def _append_jsonl(workdir: str, step: int, metrics: dict[str, float], is_main: bool) -> None:
    """Full-precision metrics, one JSON object per line, in WORKDIR/metrics.jsonl (process 0)."""
    if is_main:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def sharded_init(model: models.MlpMixer, tx: optax.GradientTransformation, mesh: Mesh):
    """(jitted `init_state(rng) -> TrainState`, the TrainState of NamedShardings it produces).

    Parameter shardings come from the model's logical axis names; optimizer-state leaves shaped
    like a parameter take that parameter's sharding, the rest (counts) are replicated.
    """
    image_shape = (1, model.image_size, model.image_size, 3)

    def init_boxed(rng: jax.Array) -> tuple[Any, Any]:
        params = model.init(jax.random.fold_in(rng, 0), jnp.zeros(image_shape, jnp.float32))["params"]
        return params, tx.init(nn.unbox(params))

    boxed_params, abstract_opt = jax.eval_shape(init_boxed, jax.random.key(0))
    param_shardings = sharding.logical_shardings(boxed_params, mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings, transform_non_params=lambda _: sharding.replicated(mesh)
    )
    shardings = TrainState(
        step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings, rng=sharding.replicated(mesh)
    )

    @functools.partial(jax.jit, out_shardings=shardings)
    def init_state(rng: jax.Array) -> TrainState:
        params, opt_state = init_boxed(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=nn.unbox(params), opt_state=opt_state, rng=rng)

    return init_state, shardings


def state_from_weights(
    config: ml_collections.ConfigDict,
    model: models.MlpMixer,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    rng: jax.Array,
) -> TrainState:
    """Step 0 of a run that starts from the weights at `config.init.path` (see `weights.load`).

    Every process reads the file and places only its devices' shards of each parameter; the
    optimizer state is then initialised on the mesh, sharded like a fresh run's.
    """
    host_params = weights.load(config.init.path, model, new_head=config.init.new_head)
    trained = weights.saved_model_config(config.init.path).get("gelu_approximate")
    if trained is not None and trained != config.model.gelu_approximate:
        logging.warning(
            "init.path %s was trained with the %s GELU, but config key 'model.gelu_approximate' is %s: the "
            "pretrained function changes. Set --config.model.gelu_approximate=%s to keep it.",
            config.init.path,
            "tanh" if trained else "exact",
            config.model.gelu_approximate,
            trained,
        )
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host_params, shardings.params
    )

    @functools.partial(jax.jit, out_shardings=shardings, donate_argnums=0)
    def init_state(params: Any, rng: jax.Array) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return init_state(params, rng)


def steps_per_call(config: ml_collections.ConfigDict) -> int:
    """`config.steps_per_call`, lowered to divide every logging, evaluation, few-shot and checkpoint
    period, so that calls end on those steps."""
    periods = (config.log_every, config.eval_every, config.checkpoint_every)
    return math.gcd(config.steps_per_call, *periods, config.fewshot.every if config.fewshot.datasets else 0)


def compiler_options(platform: str) -> dict[str, Any] | None:
    """XLA options for the train step on `platform` ("cpu", "gpu", "tpu").

    On GPU, bfloat16 values are rounded where the program rounds them (`xla_allow_excess_precision`
    off). With excess precision allowed, XLA drops the rounding of the channel MLP's GELU input
    gradient: the pass that forms it writes it in float32, and a second pass reads it back to round
    it and sum the bias gradient. Rounded as written, one pass does both. B/16, bfloat16, batch 256
    on an H100: 6.5% more images/s (4443 -> 4734, and 4468 -> 4763 on a second card). CPU and TPU
    keep XLA's defaults (not measured there)."""
    return {"xla_allow_excess_precision": False} if platform == "gpu" else None


def make_train_step(
    config: ml_collections.ConfigDict,
    model: models.MlpMixer,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
):
    """The jitted call `(state, batches) -> (state, metrics)`, one train step per entry of the
    batches' leading axis, in order (a `lax.scan` when there are several: one dispatch and one
    temporary buffer for all of them). The state is donated; the metrics lead with the steps axis.
    """
    accum = config.accum_steps
    finish = preprocess.parse(config.input.pp_train).on_device

    def grads_and_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[Any, jax.Array]:
        def objective(params):
            logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
            return loss_fn(config.loss, logits, batch["labels"]).mean()

        loss, grads = jax.value_and_grad(objective)(params)
        return grads, loss

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        batch = batch | {"image": finish(batch["image"])}
        if accum == 1:
            grads, loss = grads_and_loss(state.params, batch, rng)
        else:
            # Microbatch a holds rows a, a + accum, a + 2·accum, ...: every device keeps its share of
            # each microbatch, so accumulation moves no data. Equal sizes: the mean of the
            # microbatch means is the full-batch mean.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)
            micro = jax.lax.with_sharding_constraint(micro, sharding.stacked_batch_sharding(mesh))

            def body(carry, xs):  # Sums in float32, whatever the parameter dtype.
                i, mb = xs
                grads, loss = grads_and_loss(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(lambda c, x: c + x.astype(jnp.float32), carry, (grads, loss)), None

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (state.params, jnp.zeros(())))
            (grads, loss), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, state.params)
            loss = loss / accum
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads), "train/lr": lr_schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @functools.partial(
        jax.jit,
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
        compiler_options=compiler_options(mesh.devices.flat[0].platform),
    )
    def train_steps(state: TrainState, batches: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        if jax.tree.leaves(batches)[0].shape[0] > 1:
            return jax.lax.scan(train_step, state, batches)
        state, metrics = train_step(state, jax.tree.map(lambda x: x[0], batches))
        return state, jax.tree.map(lambda x: x[None], metrics)

    return train_steps


def _evaluator(config: ml_collections.ConfigDict, model: models.MlpMixer, mesh: Mesh, eval_data: pipeline.EvalData):
    """`evaluate(params, stop) -> metrics` over the whole split: masked sums, each example counted
    once. `stop` is asked before each batch; the metrics are None when it said stop."""
    finish = preprocess.parse(config.input.pp_eval).on_device

    @jax.jit
    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = model.apply({"params": params}, finish(batch["image"]), train=False)
        mask = batch["mask"].astype(jnp.float32)
        hit = jnp.take_along_axis(batch["labels"], jnp.argmax(logits, -1)[:, None], -1)[:, 0]
        return {
            "correct": (hit > 0).astype(jnp.float32) @ mask,
            "loss": loss_fn(config.loss, logits, batch["labels"]) @ mask,
            "count": mask.sum(),
        }

    def evaluate(params: Any, stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
        totals = None
        for local_batch in eval_data:
            if stop():
                return None
            out = eval_step(params, sharding.put_batch(local_batch, mesh, batch_size=config.batch_size))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        count = int(totals["count"])
        if count != eval_data.num_examples:
            raise RuntimeError(f"evaluation counted {count} examples, expected {eval_data.num_examples}")
        return {
            "eval/accuracy": float(totals["correct"]) / count,
            "eval/loss": float(totals["loss"]) / count,
            "eval/examples": count,
        }

    return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
    from clu import metric_writers  # Imports TensorFlow: only the training loop needs it, not `bench`.

    # However the run ends, what it opened is closed, last opened first: checkpointers finish their
    # saves in flight and stop Orbax's threads; the writer flushes its events and stops its thread.
    with contextlib.ExitStack() as closing:
        # TensorBoard event files from process 0; the console line is the human-readable log.
        writer = (
            metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
            if jax.process_index() == 0
            else metric_writers.MultiWriter([])
        )
        closing.callback(writer.close)
        return _train_and_evaluate(config, workdir, writer, closing)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, writer: Any, closing: contextlib.ExitStack
) -> dict[str, float]:
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())

    # Data. Process 0 prepares a built-in dataset before the others open it.
    if is_main:
        pipeline.prepare(config.input)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset prepared")
    pipeline.check_examples(config)  # Before any compile: images and labels that fit the model.
    # Each process reads the slice of every global batch that its devices hold.
    index, count = sharding.batch_slice(mesh, config.batch_size)
    shard = dict(process_index=index, process_count=count)
    train_iter = pipeline.make_train(config, **shard)
    eval_data = pipeline.make_eval(config, **shard)

    # Model, optimizer, and the sharded train state: shapes first, then a jitted init whose
    # outputs are placed by the logical-axis rules, so no tensor is ever whole on one device.
    model = create_model(config)
    tx, lr_schedule = optim.make(config)
    base_rng = jax.random.key(config.seed)
    init_state, state_shardings = sharded_init(model, tx, mesh)
    abstract_state = jax.eval_shape(init_state, base_rng)
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info("model %s at %d px: %s parameters", config.model.variant, config.model.image_size, f"{num_params:,}")

    # Resume from the latest complete checkpoint in the workdir (or, in eval mode, the one asked
    # for), restored straight into this mesh's shardings; or start fresh.
    abstract_sharded = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
    if config.mode == "eval":
        source, step = _eval_source(config, f"{workdir}/checkpoints", closing)
        params = source.restore_params(step, abstract_sharded.params)
        logging.info("restored step %d from %s", step, source.directory)
        eval_metrics = _evaluator(config, model, mesh, eval_data)(params)
        _append_jsonl(workdir, step, eval_metrics, is_main)
        logging.info(
            "evaluated step %d: accuracy %.2f%% on %d examples, loss %.4f",
            step,
            100 * eval_metrics["eval/accuracy"],
            eval_metrics["eval/examples"],
            eval_metrics["eval/loss"],
        )
        return eval_metrics
    ckpt = checkpointing.Checkpointer(
        f"{workdir}/checkpoints",
        keep=config.keep_checkpoints,
        keep_best=config.keep_best,
        best_metric=config.best_metric,
    )
    closing.callback(ckpt.close)
    step_to_restore = ckpt.latest_step()
    deferred: tuple[str, ...] = ()  # Evaluations of the restored step that its run left undone.
    if step_to_restore is not None:
        _check_resumable(config, ckpt, step_to_restore)
        state, data_state = ckpt.restore(step_to_restore, abstract_sharded)
        train_iter.set_state(data_state)
        logging.info("restored step %d from %s", step_to_restore, ckpt.directory)
        deferred = ckpt.deferred(step_to_restore)
    elif config.init.path:
        state = state_from_weights(config, model, tx, state_shardings, base_rng)
        logging.info("initialised from %s%s", config.init.path, " with a new head" if config.init.new_head else "")
    else:
        state = init_state(base_rng)
    first_step = int(state.step)

    train_steps = make_train_step(config, model, tx, lr_schedule, mesh, state_shardings)

    evaluate = _evaluator(config, model, mesh, eval_data)
    fewshot_eval = _fewshot_evaluator(config, model)

    # The loop. Metrics stay on the device until they are needed (log and checkpoint steps), so
    # the host runs ahead of the device; a checkpoint is only written after its steps' losses and
    # gradients were checked finite, so the last checkpoint is always a good one.
    flops_per_step = 6 * models.forward_macs(model) * config.batch_size
    pending: list[dict[str, jax.Array]] = []
    window: list[dict[str, float]] = []
    last_log = (time.perf_counter(), first_step)
    train_start = time.perf_counter()
    eval_metrics: dict[str, float] = {}
    preemption = checkpointing.Preemption()
    closing.callback(preemption.close)
    logging.info("training from step %d to %d", first_step, config.total_steps)

    def publish(step: int, metrics: dict[str, float]) -> None:
        # A copy: the writer reads it on its own thread, after the loop may have extended `metrics`.
        writer.write_scalars(step, dict(metrics))
        _append_jsonl(workdir, step, metrics, is_main)

    def run_evaluations(
        step: int, params: Any, due: tuple[str, ...], stop: Callable[[], bool] = lambda: False
    ) -> tuple[dict[str, float], tuple[str, ...]]:
        """Runs the evaluations in `due` ("eval", then "fewshot") of `params`, the state at `step`,
        and publishes and logs each one that completes. Returns the evaluation's metrics, with the
        few-shot ones when both ran (the checkpoint's metrics and the run's result), and the
        evaluations left undone because `stop`, asked before each batch, said stop."""
        nonlocal last_log
        results: dict[str, float] = {}
        for i, kind in enumerate(due):
            metrics = evaluate(params, stop) if kind == "eval" else fewshot_eval(params, model, stop)
            last_log = (time.perf_counter(), step)  # Keep evaluation out of the step rate.
            if metrics is None:
                return results, due[i:]
            publish(step, metrics)
            if kind == "eval":
                logging.info(
                    "step %d  eval accuracy %.4f  loss %.4f  (%d examples)",
                    step,
                    metrics["eval/accuracy"],
                    metrics["eval/loss"],
                    metrics["eval/examples"],
                )
            else:
                logging.info(
                    "step %d  few-shot %s",
                    step,
                    "  ".join(f"{k.removeprefix('fewshot/')} {100 * v:.2f}%" for k, v in metrics.items()),
                )
            results |= metrics
        return results, ()

    # The preempted run saved this step before evaluating it: that comes first, unless an earlier
    # resume did it. (Unstoppable: with the state saved, a notice now loses only the evaluation.)
    deferred = _not_yet_logged(workdir, first_step, deferred, fewshot=fewshot_eval is not None)
    if deferred:
        logging.info(
            "step %d was saved on a preemption notice before its evaluation (%s): evaluating it now",
            first_step,
            ", ".join(deferred),
        )
        if "eval" in deferred and config.keep_best:
            logging.warning("step %d was evaluated after its save: keep_best does not rank it", first_step)
        results, _ = run_evaluations(first_step, state.params, deferred)
        if "eval" in deferred:
            eval_metrics = results

    per_call, step = steps_per_call(config), first_step
    if per_call != config.steps_per_call:
        logging.info(
            "%d steps per call: steps_per_call=%d, lowered to divide the periods", per_call, config.steps_per_call
        )
    with mesh:
        while step < config.total_steps:
            # Calls end on multiples of per_call, which divides every period, and at total_steps.
            n = min(per_call - step % per_call, config.total_steps - step)
            local = [next(train_iter) for _ in range(n)]
            batches = sharding.put_batch(
                jax.tree.map(lambda *x: np.stack(x), *local), mesh, batch_size=config.batch_size, stacked=True
            )
            with jax.transfer_guard("disallow"):  # The call's one transfer is above; nothing waits.
                state, metrics = train_steps(state, batches)
            step += n
            pending.append(metrics)
            is_last = step == config.total_steps
            preempted = preemption.reached()
            is_log = step % config.log_every == 0 or is_last
            is_eval = is_last or bool(config.eval_every and step % config.eval_every == 0)
            is_fewshot = bool(fewshot_eval) and (
                is_last or bool(config.fewshot.every and step % config.fewshot.every == 0)
            )
            due = ("eval",) * is_eval + ("fewshot",) * is_fewshot
            is_save = is_last or bool(config.checkpoint_every and step % config.checkpoint_every == 0)

            # Checked finite before anything is saved (a notice may come during the evaluations).
            if is_log or is_save or preempted or due:
                fetched = [
                    {k: v[i] for k, v in m.items()}
                    for m in jax.device_get(pending)
                    for i in range(len(m["train/loss"]))
                ]
                _check_finite(fetched, step - len(fetched) + 1, ckpt)
                window += fetched
                pending = []

            if is_log:
                summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                window = []
                now = time.perf_counter()
                steps_per_s = (step - last_log[1]) / (now - last_log[0])
                last_log = (now, step)
                summary |= {
                    "perf/steps_per_s": steps_per_s,
                    "perf/images_per_s": steps_per_s * config.batch_size,
                    "perf/tflops": steps_per_s * flops_per_step / 1e12,
                }
                publish(step, summary)
                eta = (config.total_steps - step) / max(steps_per_s, 1e-9)
                logging.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  %.1f img/s  ETA %s",
                    step,
                    config.total_steps,
                    summary["train/loss"],
                    summary["train/lr"],
                    steps_per_s,
                    summary["perf/images_per_s"],
                    _format_time(eta),
                )

            # A preemption notice, before or during the evaluations, leaves them to the resumed run
            # (recorded with the checkpoint): the save comes first, within the notice's grace period.
            left = due if preempted else ()
            if due and not preempted:
                results, left = run_evaluations(step, state.params, due, stop=preemption.reached)
                preempted = bool(left)
                if "eval" in due and "eval" not in left:
                    eval_metrics = results
            if is_save or preempted:
                ckpt.save(
                    step,
                    state,
                    train_iter.get_state(),
                    config,
                    metrics=eval_metrics if is_eval and "eval" not in left else None,
                    deferred=left,
                )
            if preempted:
                ckpt.wait()
                raise Preempted(step, ckpt.directory, evaluated_on_resume=bool(left))

    ckpt.wait()
    if not eval_metrics and first_step == config.total_steps:
        eval_metrics = evaluate(state.params)  # Re-run of a finished workdir: report, don't train.
    logging.info(
        "done in %s: step %d, final test accuracy %.2f%% on %d examples",
        _format_time(time.perf_counter() - train_start),
        int(state.step),
        100 * eval_metrics.get("eval/accuracy", float("nan")),
        eval_metrics.get("eval/examples", 0),
    )
    return eval_metrics


class Preempted(Exception):
    """The run saved a checkpoint at `step` and stopped on a preemption notice; re-run to resume."""

    def __init__(self, step: int, directory: str, evaluated_on_resume: bool = False):
        then = f" (it evaluates step {step} first)" if evaluated_on_resume else ""
        super().__init__(f"preempted: saved step {step} in {directory}; re-run the same command to resume{then}")
        self.step = step


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


def _check_finite(fetched: list[dict[str, np.ndarray]], first_step: int, ckpt: checkpointing.Checkpointer) -> None:
    for i, m in enumerate(fetched):
        if not (np.isfinite(m["train/loss"]) and np.isfinite(m["train/grad_norm"])):
            ckpt.wait()  # Saves in flight hold good states: let them finish.
            good = ckpt.all_steps()
            last = f"step {max(good)} in {ckpt.directory}" if good else "none yet"
            raise NonFiniteError(
                f"non-finite training loss {float(m['train/loss'])} (gradient norm {float(m['train/grad_norm'])}) "
                f"at step {first_step + i}; nothing after it was saved. The last good checkpoint: {last}. "
                "Lower --config.lr, lengthen --config.warmup_steps or set --config.grad_clip_norm, then re-run "
                "to resume from it."
            )


def _not_yet_logged(workdir: str, step: int, deferred: tuple[str, ...], *, fewshot: bool) -> tuple[str, ...]:
    """The evaluations in `deferred` that have no row at `step` in WORKDIR/metrics.jsonl (an earlier
    resume may have run them) and that this run can do. Process 0, which writes the log, decides
    for all."""
    if not deferred:
        return ()
    logged = set()
    if jax.process_index() == 0 and os.path.exists(path := os.path.join(workdir, "metrics.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # A line cut short by a kill.
                    continue
                if row.get("step") == step:
                    logged |= {"eval"} if "eval/accuracy" in row else set()
                    logged |= {"fewshot"} if any(k.startswith("fewshot/") for k in row) else set()
    kinds = ("eval", "fewshot")
    todo = np.array([k in deferred and k not in logged and (k == "eval" or fewshot) for k in kinds], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
    return tuple(k for k, do in zip(kinds, todo, strict=True) if do)


def _check_resumable(config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer, step: int) -> None:
    """Refuses a checkpoint past the run's end, or written with another config."""
    if step > config.total_steps:
        raise checkpointing.CheckpointError(
            f"checkpoint step {step} in {ckpt.directory} is past total_steps={config.total_steps}: raise "
            "--config.total_steps to continue it, or use a new --workdir."
        )
    if config.allow_config_change:
        return
    diff = checkpointing.config_diff(ckpt.saved_config(step), config)
    if diff:
        raise checkpointing.CheckpointError(
            f"the config differs from the one saved with checkpoint step {step} in {ckpt.directory}: "
            + "; ".join(diff)
            + ". Resume with the saved config, use a new --workdir, or pass --config.allow_config_change=True."
        )


def _fewshot_evaluator(config: ml_collections.ConfigDict, model: models.MlpMixer) -> fewshot.Evaluator | None:
    f = config.fewshot
    if not f.datasets:
        return None
    return fewshot.Evaluator(
        f.datasets,
        image_size=model.image_size,
        data_dir=config.input.data_dir,
        pp=f.pp,
        shots=f.shots,
        l2_reg=f.l2_reg,
        num_seeds=f.num_seeds,
        max_test_examples=f.max_test_examples,
        seed=config.seed,
    )


def _eval_source(
    config: ml_collections.ConfigDict, checkpoints: str, closing: contextlib.ExitStack
) -> tuple[checkpointing.Checkpointer, int]:
    """(checkpointer, step) named by `eval_checkpoint`: "" (the latest in `checkpoints`, the
    workdir's), a workdir, a checkpoints directory, or one step's directory. Opened read-only: they
    may be a live run's, whose saves in flight must survive."""
    path, step = checkpointing.locate(config.eval_checkpoint or checkpoints)
    if not os.path.isdir(path):
        key = "config key 'eval_checkpoint'" if config.eval_checkpoint else "--workdir"
        raise checkpointing.CheckpointError(f"{key}: {path} does not exist; there is no checkpoint to evaluate.")
    source = checkpointing.Checkpointer(path, keep=config.keep_checkpoints, read_only=True)
    closing.callback(source.close)
    step = source.latest_step() if step is None else step
    if step is None or step not in source.all_steps():
        raise checkpointing.CheckpointError(
            f"no complete checkpoint {'at step ' + str(step) + ' ' if step is not None else ''}in {path} to "
            f"evaluate; it has {source.all_steps() or 'none'}."
        )
    return source, step
