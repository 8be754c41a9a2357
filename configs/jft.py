"""JFT-style pretraining on any user-prepared multi-label TFDS dataset (paper, Section 3).

Inception crop and horizontal flip only, sigmoid cross-entropy on multi-hot labels, Adam (0.9,
0.999), batch 4096, lr 1e-3 with 10k warmup steps then linear decay, weight decay 0.1, clipping
at global norm 1. The arguments name the dataset: `dataset`, `num_classes`, `label_key` (the
feature holding the list of labels), `train_examples` and `epochs` (which set total_steps), and
`variant`; the defaults describe JFT-300M (18,291 classes, about 303M images, 7 epochs).

python -m mixer_jax.main --config=configs/jft.py:dataset=NAME,num_classes=N,variant=H/14 --workdir=DIR
"""

from mixer_jax.config import config_args, paper_pretraining


def get_config(arg: str | None = None):
    args = config_args(
        arg,
        "configs/jft.py",
        dataset="jft",
        num_classes="18291",
        label_key="labels",
        train_examples="303000000",
        epochs="7",
        variant="B/16",
        eval_split="validation",
    )
    num_classes = int(args["num_classes"])
    c = paper_pretraining(args["variant"], num_classes=num_classes)
    c.input.dataset = args["dataset"]
    c.input.train_split, c.input.eval_split = "train", args["eval_split"]
    onehot = f"onehot({num_classes}, key={args['label_key']!r})"
    c.input.pp_train = f"decode|inception_crop(224)|flip_lr|value_range(-1,1)|{onehot}"
    c.input.pp_eval = f"decode|resize_small(256)|central_crop(224)|value_range(-1,1)|{onehot}"
    c.total_steps = -(-int(args["epochs"]) * int(args["train_examples"]) // c.batch_size)
    c.loss = "sigmoid_xent"
    return c
