"""Mixer-B/16 on ImageNet-1k from scratch (paper, Appendix B): 300 epochs at batch 4096.

Adam (0.9, 0.999), lr 1e-3 with 10k warmup steps then linear decay, weight decay 0.1, clipping at
global norm 1, RandAugment(2, 15), mixup 0.5, stochastic depth 0.1. The paper reaches 76.44% top-1.

python -m mixer_jax.main --config=configs/b16_i1k.py[:variant=S/16] --workdir=DIR --config.input.data_dir=DATA_DIR
"""

from mixer_jax.config import config_args, paper_pretraining

TRAIN_EXAMPLES = 1_281_167  # imagenet2012 train split.


def get_config(arg: str | None = None):
    args = config_args(arg, "configs/b16_i1k.py", variant="B/16", epochs="300")
    c = paper_pretraining(args["variant"], num_classes=1000)
    c.model.stoch_depth = 0.1
    c.input.dataset = "imagenet2012"
    c.input.train_split, c.input.eval_split = "train", "validation"
    c.input.pp_train = "decode|inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(1000)|mixup(0.5)"
    c.input.pp_eval = "decode|resize_small(256)|central_crop(224)|value_range(-1,1)|onehot(1000)"
    c.total_steps = -(-int(args["epochs"]) * TRAIN_EXAMPLES // c.batch_size)  # 93,836 for 300 epochs.
    c.eval_every = 5000
    return c
