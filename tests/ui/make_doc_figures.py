"""Renders the README's report figures (docs/report_*.png) from real runs of the pack's nodes in ComfyUI.

Run with ComfyUI's Python: ``COMFYUI_PATH=/path/to/ComfyUI python tests/ui/make_doc_figures.py docs``.

The model is the integration tests' tiny random SD1.5-config UNet, so the "images" are latent previews (the
SD1.5 latent-to-RGB factors ComfyUI uses for its previews), not decoded pictures; the numbers in the figures
are what SPELL and DNG really did in these runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))   # test helper, not product code

import shield_harness as h  # noqa: E402

SIZE = 256          # pixels; latents are 32x32
STEPS = 12


def latent_preview(latent_format, latents):
    """``[B, 4, h, w]`` LATENT -> uint8 ``[B, h, w, 3]`` with the model's latent-to-RGB factors."""
    import torch
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)   # [4, 3]
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors)
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().byte().numpy()


def spell_figures(nodes, model, out: Path):
    spell_nodes = h.pack_submodule("nodes.spell_nodes")
    calibration = h.pack_submodule("nodes.calibration_nodes")
    plots = h.pack_submodule("reporting.plots")
    fmt = model.model.latent_format
    plain = h.ksample(nodes, model, h.empty_latent(6, SIZE), seed=11, steps=STEPS)["samples"]
    median, radius, _ = calibration.SpellRadiusCalibration().calibrate({"samples": plain}, 1.0, model)["result"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain[:4]}, "earlier run")[0]
    latent, report = spell_nodes.SpellSampler().sample(
        model, 12, STEPS, 5.0, "euler", "normal", h.conditioning(1), h.conditioning(2), h.empty_latent(4, SIZE),
        1.0, radius=radius, overcompensation=1.0, intra_batch=True, history=False, history_name="docs",
        history_size=8, start_percent=0.0, end_percent=1.0, exact=False, shield_set=shields)["result"]
    thumbs = dict(enumerate(latent_preview(fmt, plain[:4])))
    plots.activity_chart(report).image.save(out / "report_activity_chart.png")
    plots.shield_panel(report, latent_preview(fmt, latent["samples"]), thumbs, tile=128).image.save(
        out / "report_shield_panel.png")
    print(f"calibrated median {median:.4g}, radius {radius:.4g}; {report.summary()}")


def dng_figure(model, nodes, out: Path):
    dng_nodes = h.pack_submodule("nodes.dng_nodes")
    plots = h.pack_submodule("reporting.plots")
    patched, trace = dng_nodes.DynamicNegativeGuidance().apply(
        model, concept=h.conditioning(3), scale=10.0, prior=0.01, temperature=0.2, offset=0.002, p_max=0.9,
        p_min=1e-6, start_percent=0.0, end_percent=1.0, mode="dynamic")
    h.ksample(nodes, patched, h.empty_latent(3, SIZE), seed=5, steps=STEPS, sampler="euler_ancestral",
              positive=h.conditioning(1), negative=h.conditioning(2))
    plots.dng_chart(trace).image.save(out / "report_dng.png")
    print(trace.summary())


def main(out: Path):
    if h.comfy_path() is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    out.mkdir(parents=True, exist_ok=True)
    nodes = h.boot_comfy()
    h.load_pack()
    model = h.tiny_model()
    spell_figures(nodes, model, out)
    dng_figure(model, nodes, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[1] / "docs")
