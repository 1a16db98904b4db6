"""The training example runs end to end at a tiny size and the loss goes down."""
import math

from bench import train_nfnet


def test_tiny_training_run_learns_synthetic_classes():
    losses = train_nfnet.main(["--variant", "tiny", "--steps", "12", "--batch", "8", "--image-size", "16",
                               "--device", "cpu"])
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert min(losses[-4:]) < losses[0]
