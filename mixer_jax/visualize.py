"""PNG figures of a model and of a run.

python -m mixer_jax.visualize tokens --weights=PATH [--variant=B/16] [--blocks=0] [--out=tokens.png]
    The hidden units of token-mixing MLPs, as the paper draws them: each unit's weight vector over
    the S tokens (a column of token_mixing/Dense_0/kernel), drawn on the sqrt(S) x sqrt(S) patch
    grid, red positive and blue negative, each unit scaled to its own largest |weight|.
python -m mixer_jax.visualize curves --workdir=DIR [--out=DIR/curves.png]
    Loss, accuracy and learning rate over steps, from DIR/metrics.jsonl (else its TensorBoard events).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------
# Token-mixing units.


def token_mixing_units(flat: Mapping[str, np.ndarray], block: int) -> np.ndarray:
    """(D_S, g, g): the first token-mixing Dense's weights of each hidden unit on the g x g patch grid."""
    kernel = np.asarray(flat[f"MixerBlock_{block}/token_mixing/Dense_0/kernel"], np.float32)  # (S, D_S)
    grid = math.isqrt(kernel.shape[0])
    return kernel.T.reshape(-1, grid, grid)


def diverging_rgb(units: np.ndarray) -> np.ndarray:
    """(N, g, g) weights -> (N, g, g, 3) uint8: white at 0, red at +max|w|, blue at -max|w| per unit."""
    scale = np.abs(units).max(axis=(1, 2), keepdims=True)
    v = units / np.where(scale > 0, scale, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1)  # Red keeps R, blue keeps B.
    return np.round(255 * np.clip(rgb, 0, 1)).astype(np.uint8)


def tile_units(units: np.ndarray, columns: int = 16, cell: int = 48, gap: int = 2) -> Image.Image:
    """One image with the units in rows of `columns`, each magnified to about `cell` pixels."""
    n, grid, _ = units.shape
    zoom = max(1, cell // grid)
    size = grid * zoom
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (size + gap) + gap, columns * (size + gap) + gap, 3), 96, np.uint8)
    rgb = diverging_rgb(units).repeat(zoom, 1).repeat(zoom, 2)
    for i, tile in enumerate(rgb):
        r, c = divmod(i, columns)
        y, x = gap + r * (size + gap), gap + c * (size + gap)
        canvas[y : y + size, x : x + size] = tile
    return Image.fromarray(canvas)


def draw_tokens(flat: Mapping[str, np.ndarray], blocks: Sequence[int], out: str, columns: int = 16) -> str:
    """Writes the units of each block in `blocks`, one titled section per block, to the PNG `out`."""
    font = ImageFont.load_default()
    sections = []
    for b in blocks:
        grid_image = tile_units(token_mixing_units(flat, b), columns)
        section = Image.new("RGB", (grid_image.width, grid_image.height + 18), "white")
        ImageDraw.Draw(section).text((4, 3), f"MixerBlock_{b} token-mixing hidden units", fill="black", font=font)
        section.paste(grid_image, (0, 18))
        sections.append(section)
    figure = Image.new("RGB", (max(s.width for s in sections), sum(s.height for s in sections)), "white")
    y = 0
    for s in sections:
        figure.paste(s, (0, y))
        y += s.height
    figure.save(out)
    return out


# ---------------------------------------------------------------------------------------------
# Training curves.

PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("accuracy", ("eval/accuracy",)),
    ("learning rate", ("train/lr",)),
)
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from WORKDIR/metrics.jsonl, or from its TensorBoard event files."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        series.setdefault(k, []).append((int(record["step"]), float(v)))
        return series
    events = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    if not events:
        raise FileNotFoundError(f"{workdir} has neither metrics.jsonl nor TensorBoard event files")
    import tensorflow as tf

    for event_file in events:
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for v in event.summary.value:
                value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                series.setdefault(v.tag, []).append((int(event.step), value))
    return series


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def draw_panel(title: str, lines: Mapping[str, list[tuple[int, float]]], size=(480, 320)) -> Image.Image:
    """One line plot with axes, min/max tick labels and a legend."""
    w, h = size
    left, right, top, bottom = 58, 12, 24, 34
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 5), title, fill="black", font=font)
    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    points = [p for pts in lines.values() for p in pts]
    if not points:
        draw.text((left + 10, h // 2), "no data", fill="gray", font=font)
        return image
    steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
    y0, y1 = values.min(), values.max()
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(s: float, v: float) -> tuple[float, float]:
        return (
            left + (s - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom),
        )

    for frac in (0.0, 0.5, 1.0):
        v = y0 + frac * (y1 - y0)
        _, y = to_px(x0, v)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((2, y - 6), _fmt(v), fill="black", font=font)
        s = x0 + frac * (x1 - x0)
        x, _ = to_px(s, y0)
        draw.line((x, h - bottom, x, h - bottom + 4), fill="black")
        draw.text((x - 10, h - bottom + 6), str(int(round(s))), fill="black", font=font)
    draw.text(((w - right + left) // 2 - 10, h - 14), "step", fill="black", font=font)
    for i, (tag, pts) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        xy = [to_px(s, v) for s, v in sorted(pts)]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        else:
            draw.line(xy, fill=color, width=2)
        draw.text((w - right - 130, top + 4 + 12 * i), tag, fill=color, font=font)
    return image


def draw_curves(workdir: str, out: str) -> str:
    """Loss, accuracy and learning-rate panels side by side in the PNG `out`."""
    series = read_metrics(workdir)
    panels = [draw_panel(title, {t: series[t] for t in tags if t in series}) for title, tags in PANELS]
    figure = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width
    figure.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixer_jax.visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tokens = commands.add_parser("tokens", help="token-mixing hidden units as images")
    tokens.add_argument("--weights", required=True, help=".npz, .safetensors, .pth, workdir or checkpoint")
    tokens.add_argument("--variant", default=None, help="e.g. B/16; checked against the weights if given")
    tokens.add_argument("--blocks", default="0", help="comma-separated block indices")
    tokens.add_argument("--columns", type=int, default=16)
    tokens.add_argument("--out", default="tokens.png")
    curves = commands.add_parser("curves", help="loss, accuracy and learning rate of a run")
    curves.add_argument("--workdir", required=True)
    curves.add_argument("--out", default=None, help="default: WORKDIR/curves.png")
    args = parser.parse_args(argv)
    from mixer_jax import weights

    try:
        if args.command == "tokens":
            flat = weights.read(args.weights)
            if args.variant:
                weights.model_for(flat, args.variant)  # Checks that the weights are that variant.
            num_blocks = weights.architecture(flat)["num_blocks"]
            blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
            if not blocks or any(not 0 <= b < num_blocks for b in blocks):
                raise ValueError(f"--blocks={args.blocks}: the weights have blocks 0..{num_blocks - 1}")
            out = draw_tokens(flat, blocks, args.out, args.columns)
        else:
            out = draw_curves(args.workdir, args.out or os.path.join(args.workdir, "curves.png"))
    except (weights.WeightsError, ValueError, FileNotFoundError) as e:
        print(f"mixer_jax.visualize: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
