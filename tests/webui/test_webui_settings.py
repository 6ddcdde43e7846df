"""The script's settings in a real WebUI: infotext written and pasted back, bad input stops or warns visibly."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

import webui_harness as harness
from test_spell_webui import generate, script_args

PASTED = {"enabled": True, "radius_rms": 0.137, "overcompensation": 1.6, "intra_batch": False, "history": True,
          "history_name": "studio", "start_percent": 0.1, "end_percent": 0.9, "exact": True,
          "shield_folder": "protected/set1", "start_coupling": "2x2", "init_image_shield": "exclude it"}


@pytest.fixture(scope="module")
def sd_model(webui):
    return harness.tiny_sd_model()


def infotext_of(g) -> str:
    from modules import processing
    return processing.create_infotext(g.p, g.p.all_prompts, g.p.all_seeds, g.p.all_subseeds)


def pasted_values(script_module, text: str) -> dict:
    """What "Send to txt2img" puts into each control of the accordion (the script's own infotext_fields)."""
    import gradio as gr
    from modules import infotext_utils
    from shielded_webui.settings import ShieldedSettings
    script = script_module.ShieldedSamplingScript()
    with gr.Blocks():
        controls = script.ui(False)
    names = {id(c): f.name for c, f in zip(controls, fields(ShieldedSettings))}
    params = infotext_utils.parse_generation_parameters(text)
    return {names[id(c)]: fn(params) for c, fn in script.infotext_fields}


def test_infotext_round_trip(script_module, sd_model):
    from modules import paths_internal
    (Path(paths_internal.models_path) / "shields" / "protected" / "set1").mkdir(parents=True, exist_ok=True)
    g = harness.Generation(script_module, sd_model, script_args(**PASTED))
    g.script.process(g.p, *g.args)
    text = infotext_of(g)
    assert "SPELL radius: 0.137" in text and "Start coupling: spread 2x2" in text, text
    values = pasted_values(script_module, text)
    assert values == {k: v for k, v in PASTED.items()}, values


def test_pasting_an_image_without_spell_switches_it_off(script_module, sd_model):
    g = harness.Generation(script_module, sd_model, script_args(enabled=False))
    g.script.process(g.p, *g.args)
    text = infotext_of(g)
    assert "SPELL" not in text
    assert pasted_values(script_module, text)["enabled"] is False


def test_radius_zero_stops_the_generation_with_a_message(script_module, sd_model):
    with pytest.raises(RuntimeError, match=r"'Radius' must be > 0 \(got 0.0\).*generation stopped"):
        generate(script_module, sd_model, enabled=True, radius_rms=0.0)


def test_radius_zero_continues_unshielded_only_when_allowed(script_module, sd_model):
    _, reference = generate(script_module, sd_model)
    g, out = generate(script_module, sd_model, enabled=True, radius_rms=0.0, allow_unshielded=True)
    assert any(c.startswith("UNSHIELDED: Shielded sampling: 'Radius' must be > 0") for c in g.p.comments), g.p.comments
    assert g.p.shielded_sampling_state.runs == []
    assert g.p.extra_generation_params["SPELL result"].startswith("UNSHIELDED: Shielded sampling: 'Radius' must be > 0")
    assert torch.equal(out, reference)


def test_folder_outside_the_roots_is_refused(script_module, sd_model, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(RuntimeError, match="outside the allowed roots.*allowed_roots.txt.*generation stopped"):
        generate(script_module, sd_model, enabled=True, shield_folder=str(outside))
    with pytest.raises(RuntimeError, match="leaves its root folder"):
        generate(script_module, sd_model, enabled=True, shield_folder="../../etc")


def test_shields_of_another_latent_shape_are_refused(script_module, sd_model, monkeypatch):
    from modules import paths_internal
    from guidance.shields import TensorShields
    from shielded_webui import webui_script
    (Path(paths_internal.models_path) / "shields" / "big").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(webui_script.ShieldedProcessing, "shield_source",
                        lambda self, p, shape: (TensorShields(torch.zeros(3, 4, 16, 16)), "big"))
    with pytest.raises(RuntimeError, match=r"shape 4x16x16 but this pass samples 4x8x8.*generation stopped"):
        generate(script_module, sd_model, enabled=True, shield_folder="big")
    g, _ = generate(script_module, sd_model, enabled=True, shield_folder="big", allow_unshielded=True)
    assert any("UNSHIELDED" in c and "4x16x16" in c for c in g.p.comments), g.p.comments


@pytest.mark.parametrize("settings, message", [
    (dict(start_coupling="2x2"), "'Start coupling' needs a Forge-family WebUI"),
    (dict(enabled=True, history=True), "no latent scale factor; shields and history are not supported"),
])
def test_a_webui_without_forge_patcher_refuses_what_it_cannot_do(script_module, sd_model, monkeypatch, settings,
                                                                  message):
    """Automatic1111 without Forge (no p.sd_model.forge_objects): SPELL runs through the CFG callbacks, but what
    that path cannot do stops the generation with the reason before sampling."""
    import types
    from modules import shared
    g = harness.Generation(script_module, sd_model, script_args(**settings))
    monkeypatch.setattr(shared, "sd_model", types.SimpleNamespace())  # p.sd_model of an A1111 checkpoint
    g.script.process(g.p, *g.args)
    assert g.p.shielded_sampling_state.hook == "A1111 CFG callbacks"
    with pytest.raises(RuntimeError, match=f"{message}.*generation stopped"):
        g.p.sample(conditioning=None, unconditional_conditioning=None, seeds=[1], subseeds=[1],
                   subseed_strength=0.0, prompts=["x"])


def test_xyz_plot_gets_a_radius_axis(script_module, sd_model, monkeypatch):
    from modules import script_loading, scripts
    xyz_path = harness.webui_path() / "scripts" / "xyz_grid.py"
    xyz = script_loading.load_module(str(xyz_path))
    data = scripts.ScriptClassData(xyz.Script, str(xyz_path), str(xyz_path.parent.parent), xyz)
    monkeypatch.setattr(scripts, "scripts_data", [data])
    from shielded_webui.webui_script import register_xyz_axis
    register_xyz_axis()
    register_xyz_axis()                                   # idempotent (the UI can be rebuilt)
    axes = [o for o in xyz.axis_options if o.label == "[Shielded] SPELL radius"]
    assert len(axes) == 1 and axes[0].type is float
    g = harness.Generation(script_module, sd_model, script_args(enabled=False))
    axes[0].apply(g.p, 0.31, None)
    g.script.process(g.p, *g.args)
    assert g.p.extra_generation_params["SPELL radius"] == 0.31
