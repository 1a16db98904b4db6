"""Train an NFNet with SGD_AGC, the paper's recipe in a few lines, on synthetic data or an
image folder.

It runs on a CPU at a tiny size. Synthetic data is noise whose per-class mean colour makes the labels
learnable; an image folder holds one sub-folder per class (read with Pillow, resized to
--image-size, normalised per image).

    python -m bench.train_nfnet --variant tiny --steps 20                 # CPU, synthetic
    python -m bench.train_nfnet --variant f0 --data /path/to/train --image-size 192 --batch 32 \\
        --amp bf16 --channels-last                                        # GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import NFNet, nfnet, paper_regularization, TINY_CONFIG as TINY

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VARIANTS = ("tiny",) + tuple(f"f{i}" for i in range(8))
# The tiny model is a narrow F0 (same block design), so the paper's F0 rates are its regularization.
TINY_REGULARIZATION_FROM = "f0"

EPILOG = """\
Image folders: every step takes --batch distinct images; each epoch is reshuffled and its last
partial batch (fewer than --batch images) is dropped, so --batch may not exceed the number of
images found. --steps 0 builds the model and the data pipeline and stops: a set-up check.
--paper-regularization uses the paper's dropout before the classifier (F0 0.2 ... F7 0.5) and
stochastic depth (up to 0.1, rising linearly over the blocks); the tiny model gets F0's rates.
"""


def synthetic_batches(num_classes: int, image_size: int, batch: int, seed: int = 0):
    """Endless batches of noise images whose per-class mean colour makes the labels learnable."""
    gen = torch.Generator().manual_seed(seed)
    class_means = torch.randn(num_classes, 3, 1, 1, generator=gen)
    while True:
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        images = class_means[labels] + torch.randn(batch, 3, image_size, image_size, generator=gen)
        yield images, labels


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) of root/<class>/<image>; sorted, so labels are stable."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def folder_batches(files: list[tuple[Path, int]], image_size: int, batch: int, seed: int = 0):
    """Endless batches of ``batch`` distinct images, reshuffled every epoch; an epoch's last partial
    batch is dropped so that every step sees a full batch."""
    if not 1 <= batch <= len(files):
        # Checked here too: with fewer images than a batch the epoch loop would never yield.
        raise ValueError(f"folder_batches: batch must be in [1, {len(files)}] (the number of images); got {batch}")
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)

    def load(path):
        img = Image.open(path).convert("RGB").resize((image_size, image_size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - x.mean()) / (x.std() + 1e-6)

    while True:
        order = torch.randperm(len(files), generator=gen).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            chosen = [files[i] for i in order[start:start + batch]]
            yield torch.stack([load(f) for f, _ in chosen]), torch.tensor([label for _, label in chosen])


def build_model(variant: str, num_classes: int, regularize: bool) -> tuple[NFNet, str]:
    """The model and a line saying which regularization it trains with (the tiny model borrows
    F0's rates: nfkernels ships paper rates only for the F family)."""
    if not regularize:
        model = NFNet(TINY, num_classes=num_classes) if variant == "tiny" else nfnet(variant, num_classes)
        return model, "regularization: none (--paper-regularization adds the paper's dropout and stochastic depth)"
    source = TINY_REGULARIZATION_FROM if variant == "tiny" else variant
    rates = paper_regularization(source)
    if variant == "tiny":
        model = NFNet(replace(TINY, **rates), num_classes=num_classes)
    else:
        model = nfnet(variant, num_classes, **rates)
    return model, (f"regularization: dropout {rates['drop_rate']:g} before the classifier, stochastic depth up to "
                   f"{rates['drop_path_rate']:g} (the paper's {source.upper()} rates)")


def progress(step: int, total: int, loss: float, seconds: float) -> None:
    width = 30
    filled = width * step // total
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {step}/{total} loss {loss:.4f} {seconds / max(step, 1) * 1e3:.0f} ms/step")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _rate(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if allow_zero else '>'} 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train_nfnet", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", choices=VARIANTS,
                        help="model: tiny (a narrow F0, one block per stage, for CPUs) or NFNet-F0 … F7 "
                             "(default: %(default)s).")
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder with one sub-folder per class; synthetic data when not given.")
    parser.add_argument("--num-classes", type=_count(1), default=10,
                        help="classes of the synthetic data (default: %(default)s; an image folder has one per "
                             "sub-folder).")
    parser.add_argument("--image-size", type=_count(1), default=32,
                        help="square input size in pixels (default: %(default)s).")
    parser.add_argument("--batch", type=_count(1), default=8,
                        help="images per step (default: %(default)s); with --data at most the number of images, "
                             "see below.")
    parser.add_argument("--steps", type=_count(0), default=20,
                        help="optimizer steps (default: %(default)s); 0 only builds the model and the data "
                             "pipeline.")
    parser.add_argument("--lr", type=_rate(allow_zero=False), default=0.1,
                        help="SGD learning rate (default: %(default)s).")
    parser.add_argument("--weight-decay", type=_rate(allow_zero=True), default=2e-5,
                        help="weight decay on weights (default: %(default)s); gains and biases get none, as in "
                             "the paper.")
    parser.add_argument("--clip-factor", type=_rate(allow_zero=False), default=0.01,
                        help="AGC clipping threshold λ (default: %(default)s, the paper's value for large batches).")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="autocast precision (default: %(default)s); fp16 adds a gradient scaler.")
    parser.add_argument("--channels-last", action="store_true", help="train in the channels_last memory format.")
    parser.add_argument("--paper-regularization", action="store_true",
                        help="the paper's dropout and stochastic depth (tiny: F0's rates; see below).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to train on (default: cuda where a GPU is visible, else cpu).")
    return parser


def main(argv=None) -> list[float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    torch.manual_seed(0)

    if args.data is not None:
        if not args.data.is_dir():
            parser.error(f"--data {args.data}: not a directory")
        if importlib.util.find_spec("PIL") is None:
            parser.error("--data needs Pillow to read images (python3 -m pip install pillow)")
        classes, files = scan_image_folder(args.data)
        if not files:
            parser.error(f"--data {args.data}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders")
        if args.batch > len(files):
            parser.error(f"--batch {args.batch} is more than the {len(files)} images in {args.data}: every step "
                         f"takes --batch distinct images, so use --batch {len(files)} or less")
        num_classes = len(classes)
        batches = folder_batches(files, args.image_size, args.batch)
        data_line = f"data: {len(files)} images in {num_classes} classes from {args.data}"
    else:
        num_classes = args.num_classes
        batches = synthetic_batches(num_classes, args.image_size, args.batch)
        data_line = f"data: synthetic, {num_classes} classes"
    model, regularization_line = build_model(args.variant, num_classes, args.paper_regularization)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    print(f"{args.variant} on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"batch {args.batch} at {args.image_size} px; {data_line}; {regularization_line}")
    # The paper: no weight decay on gains and biases, no clipping of the final classifier.
    optimizer = nfk.optim.SGD_AGC(nfk.optim.nfnet_param_groups(model, args.weight_decay), lr=args.lr,
                                  momentum=0.9, nesterov=True, clip_factor=args.clip_factor)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # AGC inside the optimizer sees unscaled gradients
        scaler.update()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            sys.exit(f"loss became {losses[-1]} at step {step}")
        progress(step, args.steps, losses[-1], time.perf_counter() - start)
    if losses:
        print(f"{args.variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps on {device}")
    else:
        print(f"{args.variant}: 0 steps, nothing trained (model and data pipeline set up on {device})")
    return losses


if __name__ == "__main__":
    main()
