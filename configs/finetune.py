"""Fine-tuning with the paper's recipe (Section 3, Appendix C), from pretrained weights.

python -m mixer_jax.main --config=configs/finetune.py:dataset=cifar10,variant=B/16,res=448,init=PATH \
    --workdir=runs/b16_cifar10

Arguments (comma-separated KEY=VALUE): dataset (imagenet2012, cifar10, cifar100, oxford_iiit_pet,
oxford_flowers102, digits, or any TFDS image classification dataset with classes=N: VTAB-style,
2,500 steps), variant (default B/16), res (fine-tuning image size, default 224; digits 32), lr
(one of 0.003, 0.01, 0.03, 0.06; default 0.03, digits 0.06), init (an official .npz, timm .safetensors/.pth,
or a workdir/checkpoint), pretrain_res (the original pretraining image size, also for weights
already fine-tuned at a larger one; default 224; digits 16): when res = K x pretrain_res, the
token-mixing MLPs are widened to K²·D_S and initialised block-diagonally where the weights are
narrower (paper Appendix C), steps (override the dataset's step count).

Recipe: SGD with momentum 0.9, batch 512, cosine schedule with linear warmup, global-norm
clipping at 1, no weight decay, a new zero-initialised head; steps ImageNet 20k, CIFAR 10k,
Pets/Flowers 500, VTAB 2.5k; the learning rate from {0.003, 0.01, 0.03, 0.06}.
"""

from mixer_jax.config import config_args, defaults

LEARNING_RATES = (0.003, 0.01, 0.03, 0.06)

# name -> (classes, steps, train split, eval split)
DATASETS = {
    "imagenet2012": (1000, 20_000, "train", "validation"),
    "cifar10": (10, 10_000, "train", "test"),
    "cifar100": (100, 10_000, "train", "test"),
    "oxford_iiit_pet": (37, 500, "train", "test"),
    "oxford_flowers102": (102, 500, "train", "test"),
    "digits": (10, 300, "train", "test"),
}
VTAB_STEPS = 2_500
ARGS = ("dataset", "variant", "res", "lr", "init", "pretrain_res", "classes", "steps")


def get_config(arg: str | None = None):
    given = config_args(arg, "configs/finetune.py", **dict.fromkeys(ARGS, ""))
    args = {k: v for k, v in given.items() if v}
    dataset = args.get("dataset", "cifar10")
    digits = dataset == "digits"
    lr = float(args.get("lr", 0.06 if digits else 0.03))
    if lr not in LEARNING_RATES:
        raise ValueError(f"configs/finetune.py: lr={lr} is not one of the paper's fine-tuning rates {LEARNING_RATES}")
    if dataset in DATASETS:
        classes, steps, train_split, eval_split = DATASETS[dataset]
    elif "classes" in args:
        classes, steps, train_split, eval_split = int(args["classes"]), VTAB_STEPS, "train", "test"
    else:
        raise ValueError(
            f"configs/finetune.py: dataset={dataset!r} is not one of {', '.join(DATASETS)}; for another TFDS "
            f"dataset pass classes=N (it gets the VTAB recipe, {VTAB_STEPS} steps)"
        )
    res = int(args.get("res", 32 if digits else 224))

    c = defaults()
    c.model.variant = args.get("variant", "Ti/4" if digits else "B/16")
    c.model.image_size = res
    c.model.num_classes = classes
    pretrain_res = int(args.get("pretrain_res", 16 if digits else 224))
    c.init.path = args.get("init", "")
    c.model.pretrain_image_size = pretrain_res if c.init.path and pretrain_res != res else 0
    c.init.new_head = True  # Paper: the head is replaced by a zero-initialised one.

    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.schedule = "cosine"
    c.lr = lr
    c.total_steps = int(args.get("steps", steps))
    c.warmup_steps = min(500, c.total_steps // 10)
    c.batch_size = 512

    c.input.dataset = dataset
    c.input.train_split = train_split
    c.input.eval_split = eval_split
    if digits:  # The built-in 8x8 digits, pretrained at 16 (configs/digits.py), fine-tuned at res.
        c.batch_size = 128
        c.input.pp_train = f"pad_crop(1)|resize({res})|rgb|value_range(-1,1)|onehot({classes})"
        c.input.pp_eval = f"resize({res})|rgb|value_range(-1,1)|onehot({classes})"
    else:  # The official fine-tuning input: a random crop of 5-100% of the area and a flip; eval: resize.
        c.input.pp_train = f"decode|inception_crop({res})|flip_lr|value_range(-1,1)|onehot({classes})"
        c.input.pp_eval = f"decode|resize({res})|value_range(-1,1)|onehot({classes})"

    c.log_every = 50
    c.eval_every = max(c.total_steps // 4, 1)
    c.checkpoint_every = max(c.total_steps // 4, 1)
    return c
