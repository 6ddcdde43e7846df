"""SPELL Report, DNG Report and SPELL Radius Calibration inside the real ComfyUI (tiny random model, CPU)."""
import math

import pytest
import torch

import shield_harness as h

STEPS = 6


@pytest.fixture(scope="module")
def report_nodes(pack):
    return h.pack_submodule("nodes.report_nodes")


@pytest.fixture(scope="module")
def calibration(pack):
    return h.pack_submodule("nodes.calibration_nodes")


def run_spell(spell_nodes, model, latent, shield_set=None, radius=0.4):
    out = spell_nodes.SpellSampler().sample(
        model, 3, STEPS, 5.0, "euler", "normal", h.conditioning(1), h.conditioning(2), latent, 1.0,
        radius=radius, overcompensation=1.0, intra_batch=True, history=False, history_name="reports",
        history_size=8, start_percent=0.0, end_percent=1.0, exact=False, shield_set=shield_set)
    return out["result"]


class FakeVae:
    """Stands in for a VAE: 'decodes' a latent to a solid image whose red channel encodes its mean."""

    def decode(self, latents):
        value = latents.float().mean(dim=(1, 2, 3)).sigmoid()
        return value[:, None, None, None].expand(-1, 16, 16, 3).clone()


def test_spell_report_node_renders_both_figures(comfy_nodes, spell_nodes, report_nodes, tiny_model):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(2), seed=3, steps=STEPS)["samples"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "plain run")[0]
    latent, report = run_spell(spell_nodes, tiny_model, h.empty_latent(2), shields)
    images = torch.rand(2, 32, 32, 3)
    out = report_nodes.SpellReportNode().render(report, images=images, shield_set=shields, vae=FakeVae())
    chart, panel, summary = out["result"]
    assert chart.shape == (1, 400, 768, 3) and chart.dtype == torch.float32
    assert panel.shape[0] == 1 and panel.shape[1] == 34 + 2 * 176 + 8
    assert summary == report.summary() and summary.startswith("SPELL: r=0.4 rms")
    assert out["ui"]["text"] == [summary]
    assert len(out["ui"]["images"]) == 2 and all(i["type"] == "temp" for i in out["ui"]["images"])
    # same seed as the shields' run: SPELL moved both outputs, every output has a nearest shield
    assert all(o.nearest_shield in (0, 1) and o.repelled for o in report.outputs)
    # the shield tile shows the FakeVae's decoding of that shield (solid colour)
    tile = panel[0, 34 + 20:34 + 140, 16 + 160 + 16 + 20:16 + 160 + 16 + 140].reshape(-1, 3)
    want = FakeVae().decode(plain[report.outputs[0].nearest_shield:][:1])[0, 0, 0]
    assert torch.allclose(tile.mean(0), want, atol=2 / 255)


def test_spell_report_rejects_a_missing_report(report_nodes):
    with pytest.raises(ValueError, match="SPELL Report: input 'report'"):
        report_nodes.SpellReportNode().render(None)


def test_dng_report_node_draws_a_trace(report_nodes):
    dng = h.pack_submodule("guidance.dng")
    trace = dng.DngTrace(lam0=8.0, p_min=1e-6, p_max=0.9, prior=0.01)
    trace.start_run()
    for i in range(5):
        p = torch.tensor([0.01 * 2 ** i, 0.01 / 2 ** i])
        trace.record(10.0 - i, p, 8.0 * p / (1 - p))
    chart, summary = report_nodes.DngReportNode().render(trace)["result"]
    assert chart.shape == (1, 560, 768, 3)
    assert summary == trace.summary()
    assert (chart[0, 56:210, 70:748] < 0.9).any()          # curves in the posterior plot


def test_calibration_reports_median_in_slider_units(calibration, tiny_model):
    torch.manual_seed(0)
    samples = torch.randn(5, 4, 8, 8) * 3.0
    node = calibration.SpellRadiusCalibration()
    raw = node.calibrate({"samples": samples}, 0.5)
    scaled = node.calibrate({"samples": samples}, 0.5, model=tiny_model)
    flat = samples.flatten(1).double()
    dists = [float((flat[i] - flat[j]).norm()) for i in range(5) for j in range(i + 1, 5)]
    median_l2 = sorted(dists)[(len(dists) - 1) // 2]           # the lower median, as everywhere in the pack
    median_raw, suggested_raw, text = raw["result"]
    assert math.isclose(median_raw, median_l2 / 16, rel_tol=1e-9)              # sqrt(4*8*8) = 16
    assert math.isclose(suggested_raw, 0.5 * median_raw, rel_tol=1e-12)
    scale = tiny_model.model.latent_format.scale_factor                        # SD1.5: 0.18215
    assert math.isclose(scaled["result"][0], scale * median_raw, rel_tol=1e-6)
    info = scaled["ui"]["spell_calibration"][0]
    assert info["model_space"] and info["elements"] == 256 and info["batch"] == 5
    assert "raw VAE-latent space" in text and "model space" in scaled["result"][2]


def test_calibration_needs_a_batch(calibration):
    with pytest.raises(ValueError, match="batch_size >= 2"):
        calibration.SpellRadiusCalibration().calibrate({"samples": torch.zeros(1, 4, 8, 8)}, 0.5)


def test_dng_trace_survives_a_spell_sampler_downstream(spell_nodes):
    dng_nodes = h.pack_submodule("nodes.dng_nodes")
    tiny = h.tiny_model()
    patched, trace = dng_nodes.DynamicNegativeGuidance().apply(
        tiny, concept=h.conditioning(3), scale=10.0, prior=0.01, temperature=0.2, offset=0.002, p_max=0.9,
        p_min=1e-6, start_percent=0.0, end_percent=1.0, mode="dynamic")
    run_spell(spell_nodes, patched, h.empty_latent(2))
    assert len(trace.sigmas) == STEPS
