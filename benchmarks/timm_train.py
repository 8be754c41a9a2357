"""Train-step throughput of timm's eager PyTorch MLP-Mixer on this machine's CPU (or a CUDA GPU with
`--device=cuda`), for comparison.

Runs in its own environment (torch and timm are not dependencies of mixer_jax):

    python -m venv /tmp/timm && /tmp/timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/timm/bin/python benchmarks/timm_train.py --model=mixer_s16_224 --batch=32 --steps=10

One step is what `python -m mixer_jax.bench train` times: forward, softmax cross-entropy,
backward, global-norm clipping at 1 and an AdamW update, random images and labels. float32, or with
`--autocast=bfloat16` torch's mixed precision (matmuls in bfloat16, float32 parameters and
LayerNorm), the counterpart of mixer_jax's `model.matmul_dtype="bfloat16"`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixer_s16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--autocast", choices=["none", "bfloat16"], default="none")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast == "bfloat16"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    for _ in range(2):  # Warm-up: allocations, kernel selection.
        step().item()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()  # Waits for the device.
    seconds = (time.perf_counter() - start) / args.steps
    print(
        json.dumps(
            {
                "framework": f"torch {torch.__version__}, timm {timm.__version__}",
                "model": args.model,
                "batch": args.batch,
                "autocast": args.autocast,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "threads": args.threads,
                "step_s": seconds,
                "images_per_s": args.batch / seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
