"""Mixer-L/16 pretraining on ImageNet-21k (paper, Table 4): sigmoid cross-entropy on multi-hot labels.

Adam (0.9, 0.999), batch 4096, lr 1e-3 with 10k warmup steps then linear decay, weight decay 0.1,
clipping at global norm 1, RandAugment(2, 20), mixup 0.5, stochastic depth 0.1, 300 epochs.
`imagenet21k` is user-prepared under DATA_DIR/imagenet21k/VERSION, with 21,843 classes and the
labels of an image in the feature `labels` (a list: several synsets per image); a single-label
copy (for example one imported from an image folder) takes `:label_key=label`.

python -m mixer_jax.main --config=configs/l16_i21k.py[:variant=B/16] --workdir=DIR --config.input.data_dir=DATA_DIR
"""

from mixer_jax.config import config_args, paper_pretraining

NUM_CLASSES = 21_843


def get_config(arg: str | None = None):
    args = config_args(
        arg, "configs/l16_i21k.py", variant="L/16", epochs="300", train_examples="14197122", label_key="labels"
    )
    c = paper_pretraining(args["variant"], num_classes=NUM_CLASSES)
    c.model.stoch_depth = 0.1
    c.input.dataset = "imagenet21k"
    c.input.train_split, c.input.eval_split = "train", "validation"
    onehot = f"onehot({NUM_CLASSES}, key={args['label_key']!r})"
    c.input.pp_train = f"decode|inception_crop(224)|flip_lr|randaug(2,20)|value_range(-1,1)|{onehot}|mixup(0.5)"
    c.input.pp_eval = f"decode|resize_small(256)|central_crop(224)|value_range(-1,1)|{onehot}"
    c.total_steps = -(-int(args["epochs"]) * int(args["train_examples"]) // c.batch_size)
    c.loss = "sigmoid_xent"
    return c
