"""Make, or check, timm's reference numbers in tests/data/ (see README.md beside this file).

    python tests/data/make_timm_reference.py check             # recompute the shipped files with
                                                               # the installed timm and compare
    python tests/data/make_timm_reference.py make --out DIR    # new random models, new files

Needs timm (and so torchvision); nfkernels is not imported, so the numbers are timm's alone.
``check`` rebuilds each model from the file's own config, loads its parameters, reruns every case
(forward and backward in float64, then timm's adaptive_clip_grad) and compares logits, loss,
gradients and clipped gradients; it is how the shipped files are tied to a timm version.
``make`` draws new parameters and inputs from --seed; the tests only need *some* timm numbers,
so a new file is as good as the shipped one once ``check`` passes on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
CLIP_FACTOR, CLIP_EPS = 0.01, 1e-3
NOT_CLIPPED = "head.fc."  # timm's train.py leaves the classifier out of AGC, and so do the tests

# dm_nfnet-style configuration of timm_nfnet_tiny.pt: the F family's block design, shrunk.
NFNET_TINY_CFG = dict(depths=(1, 2, 2, 1), channels=(32, 64, 96, 96), stem_type="deep_quad", stem_chs=32,
                      group_size=16, bottle_ratio=0.5, extra_conv=True, gamma_in_act=True, same_padding=True,
                      skipinit=True, num_features=192, act_layer="gelu", attn_layer="se",
                      attn_kwargs=dict(rd_ratio=0.5), std_conv_eps=1e-5, alpha=0.2)
NFNET_TINY_INPUTS = ((4, 3, 64, 64), (2, 3, 57, 61))

# timm_nf_family_tiny.pt: timm.models.nfnet.model_cfgs[name] with these fields shrunk.
_L_SHRINK = dict(depths=(1, 2, 2, 1), channels=(32, 64, 96, 96), stem_chs=16, group_size=8, num_features=144)
_RESNET_SHRINK = dict(depths=(1, 2, 2, 1), channels=(32, 64, 96, 128), stem_chs=16)
FAMILY_SHRINK = {
    "eca_nfnet_l0": _L_SHRINK,
    "nfnet_l0": _L_SHRINK,
    "nfnet_f0": dict(depths=(1, 2, 2, 1), channels=(32, 64, 96, 96), stem_chs=16, group_size=16, num_features=192),
    "nf_regnet_b1": dict(depths=(1, 2, 2, 2), channels=(16, 24, 40, 64), num_features=128),
    "nf_resnet50": _RESNET_SHRINK,
    "nf_seresnet50": _RESNET_SHRINK,
    "nf_ecaresnet50": _RESNET_SHRINK,
}
FAMILY_INPUTS = ((3, 3, 57, 61),)


def _timm():
    try:
        import timm  # noqa: F401
        from timm.models import nfnet
        from timm.utils.agc import adaptive_clip_grad
    except ImportError as error:
        sys.exit(f"this script needs timm (pip install timm torchvision): {error}")
    return nfnet, adaptive_clip_grad


def build(cfg: dict) -> torch.nn.Module:
    nfnet, _ = _timm()
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return nfnet.NormFreeNet(nfnet.NfCfg(**fields), num_classes=NUM_CLASSES).double()


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter away from its initial value, so that every branch (SkipInit gains start
    at zero, biases at zero, gains at one) contributes to the outputs and gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.copy_(torch.empty_like(p).uniform_(0.2, 1.0, generator=generator))
            elif name.endswith("gain"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=generator))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) * 0.1)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) / math.sqrt(fan_in))


def run_case(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Train-mode forward and backward (no dropout or drop path in these configs), then timm's AGC."""
    _, adaptive_clip_grad = _timm()
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    clipped = [p for n, p in model.named_parameters() if not n.startswith(NOT_CLIPPED)]
    adaptive_clip_grad(clipped, clip_factor=CLIP_FACTOR, eps=CLIP_EPS)
    agc_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return dict(x=x, labels=labels, logits=logits.detach(), loss=loss.detach(), grads=grads, agc_grads=agc_grads)


def _new_cases(model, shapes, generator) -> list[dict]:
    return [run_case(model, torch.randn(shape, dtype=torch.float64, generator=generator),
                     torch.randint(0, NUM_CLASSES, (shape[0],), generator=generator)) for shape in shapes]


def _about(what: str) -> str:
    import timm
    return (f"timm {timm.__version__} NormFreeNet ({what}) with randomized parameters, float64; agc_grads = "
            f"timm.utils.agc.adaptive_clip_grad(clip_factor={CLIP_FACTOR}, eps={CLIP_EPS}) applied to every "
            f"parameter except {NOT_CLIPPED}*")


def make_nfnet_tiny(generator: torch.Generator) -> dict:
    model = build(NFNET_TINY_CFG)
    randomize_(model, generator)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in NFNET_TINY_CFG.items()}
    return dict(about=_about("dm_nfnet style"), cfg=cfg, num_classes=NUM_CLASSES,
                state_dict={k: v.clone() for k, v in model.state_dict().items()},
                cases=_new_cases(model, NFNET_TINY_INPUTS, generator))


def make_family(generator: torch.Generator) -> dict:
    nfnet, _ = _timm()
    out = {}
    for name, shrink in FAMILY_SHRINK.items():
        cfg = dataclasses.asdict(dataclasses.replace(nfnet.model_cfgs[name], **shrink))
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        model = build(cfg)
        randomize_(model, generator)
        out[name] = dict(about=_about(f"the config of {name}, shrunk as in cfg"), timm_config_of=name, cfg=cfg,
                         num_classes=NUM_CLASSES, params=sum(p.numel() for p in model.parameters()),
                         state_dict={k: v.clone() for k, v in model.state_dict().items()},
                         cases=_new_cases(model, FAMILY_INPUTS, generator))
    return out


def _max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-300)
    return float((got - want).abs().max() / scale)


def check_blob(label: str, blob: dict, rtol: float) -> bool:
    model = build(blob["cfg"])
    model.load_state_dict(blob["state_dict"], strict=True)
    ok = True
    for i, case in enumerate(blob["cases"]):
        new = run_case(model, case["x"], case["labels"])
        errors = {"logits": _max_relative_error(new["logits"], case["logits"]),
                  "loss": _max_relative_error(new["loss"], case["loss"])}
        for key in ("grads", "agc_grads"):
            if set(new[key]) != set(case[key]):
                print(f"{label} case {i}: {key} names differ from timm's parameters")
                ok = False
                continue
            errors[key] = max(_max_relative_error(new[key][n], case[key][n]) for n in case[key])
        worst = max(errors.values())
        ok &= worst <= rtol
        print(f"{label} case {i} {tuple(case['x'].shape)}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + ("" if worst <= rtol else f"  MISMATCH (rtol {rtol:g})"))
    return ok


def check(data_dir: Path, rtol: float) -> bool:
    ok = check_blob("timm_nfnet_tiny", torch.load(data_dir / "timm_nfnet_tiny.pt", weights_only=True), rtol)
    family = torch.load(data_dir / "timm_nf_family_tiny.pt", weights_only=True)
    for name, blob in family.items():
        ok &= check_blob(name, blob, rtol)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="recompute the files with the installed timm and compare")
    c.add_argument("--data-dir", type=Path, default=HERE)
    c.add_argument("--rtol", type=float, default=1e-10,
                   help="largest relative error accepted (float64; default %(default)g)")
    m = sub.add_parser("make", help="write new files from new random models")
    m.add_argument("--out", type=Path, required=True, help="folder for the two .pt files")
    m.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    if args.command == "check":
        ok = check(args.data_dir, args.rtol)
        print("all match" if ok else "MISMATCH")
        return 0 if ok else 1
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(make_nfnet_tiny(generator), args.out / "timm_nfnet_tiny.pt")
    torch.save(make_family(generator), args.out / "timm_nf_family_tiny.pt")
    print(f"wrote {args.out / 'timm_nfnet_tiny.pt'} and {args.out / 'timm_nf_family_tiny.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
