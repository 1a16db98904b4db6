"""Train an NFNet with SGD_AGC: the paper's recipe in a few lines, on synthetic data or an image
folder (one sub-folder per class). Runs on a CPU at a tiny size.

    python -m bench.train_nfnet --variant tiny --steps 20                 # CPU, synthetic
    python -m bench.train_nfnet --variant f0 --data /path/to/train --image-size 192 --batch 32 \\
        --amp bf16 --channels-last                                        # GPU
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import NFNet, nfnet, paper_regularization, TINY_CONFIG as TINY

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def synthetic_batches(num_classes: int, image_size: int, batch: int, seed: int = 0):
    """Endless batches of noise images whose per-class mean colour makes the labels learnable."""
    gen = torch.Generator().manual_seed(seed)
    class_means = torch.randn(num_classes, 3, 1, 1, generator=gen)
    while True:
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        images = class_means[labels] + torch.randn(batch, 3, image_size, image_size, generator=gen)
        yield images, labels


def folder_batches(root: Path, image_size: int, batch: int, seed: int = 0):
    """Endless shuffled batches from root/<class>/<image>, resized and normalised per image."""
    try:
        from PIL import Image
    except ImportError:
        sys.exit("--data needs Pillow to read images (pip install pillow)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        sys.exit(f"--data {root}: no images found in class sub-folders")
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


def progress(step: int, total: int, loss: float, seconds: float) -> None:
    width = 30
    filled = width * step // total
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {step}/{total} loss {loss:.4f} {seconds / max(step, 1) * 1e3:.0f} ms/step")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny", help="tiny or f0 … f7")
    parser.add_argument("--data", type=Path, help="image folder (one sub-folder per class); default synthetic")
    parser.add_argument("--num-classes", type=int, default=10, help="for synthetic data")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=2e-5)
    parser.add_argument("--clip-factor", type=float, default=0.01)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--paper-regularization", action="store_true", help="the paper's dropout/drop-path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.data is not None:
        num_classes = len([p for p in args.data.iterdir() if p.is_dir()])
        batches = folder_batches(args.data, args.image_size, args.batch)
    else:
        num_classes = args.num_classes
        batches = synthetic_batches(num_classes, args.image_size, args.batch)
    if args.variant == "tiny":
        model = NFNet(TINY, num_classes=num_classes)
    else:
        extra = paper_regularization(args.variant) if args.paper_regularization else {}
        model = nfnet(args.variant, num_classes, **extra)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
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
    print(f"{args.variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps on {device}")
    return losses


if __name__ == "__main__":
    main()
