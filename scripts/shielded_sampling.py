"""Automatic1111 / Forge entry point: the "Shielded sampling" accordion in txt2img and img2img.

The WebUI loads this file from ``extensions/<this repository>/scripts/`` with the extension's folder on
``sys.path``, so the pack's ``shielded_webui``, ``guidance`` and ``shield_db`` packages import by name (ComfyUI
loads the repository's ``__init__.py`` instead and never sees this folder). The work is in ``shielded_webui``.
"""
from __future__ import annotations

import gradio as gr

from modules import script_callbacks, scripts

from guidance import history
from shielded_webui import a1111_hook, infotext
from shielded_webui.settings import COUPLINGS, DEFAULT_HISTORY, INIT_CHOICES, INIT_LEAVE, SCRIPT, ShieldedSettings
from shielded_webui.webui_script import ShieldedProcessing, register_xyz_axis

RADIUS_HELP = ("Shield radius, resolution-free: RMS distance per latent element in the model's latent space "
               "(raw L2 radius = radius x sqrt(C*H*W), x128 at 512x512 for SD1.5). Same units as the ComfyUI "
               "node; a good start is the median pairwise distance of an unguided batch, or a fraction of it.")


class ShieldedSamplingScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return SCRIPT

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"

        def eid(name):
            return f"shielded_sampling_{tab}_{name}"

        with gr.Accordion(SCRIPT, open=False, elem_id=eid("accordion")):
            with gr.Row():
                enabled = gr.Checkbox(False, label="Enable SPELL (keep outputs out of the shields)", elem_id=eid("enabled"))
                allow = gr.Checkbox(False, label="Continue unshielded if the setup fails", elem_id=eid("allow"),
                                    info="Off: a bad setting stops the generation with a message.")
            radius = gr.Slider(0.001, 2.0, value=0.2, step=0.001, label="Radius (RMS per latent element)",
                               info=RADIUS_HELP, elem_id=eid("radius"))
            with gr.Row():
                overcomp = gr.Slider(1.0, 4.0, value=1.0, step=0.05, label="Overcompensation (lambda)",
                                     elem_id=eid("overcompensation"))
                start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Active from (fraction of schedule)",
                                  elem_id=eid("start"))
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Active until", elem_id=eid("end"),
                                info="Below 1 the outputs are no longer guaranteed to stay outside the shields.")
            with gr.Row():
                intra = gr.Checkbox(True, label="Intra-batch (repel the images of a batch from each other)",
                                    elem_id=eid("intra"))
                exact = gr.Checkbox(False, label="Exact mode (overlapping shields)", elem_id=eid("exact"))
                chart = gr.Checkbox(False, label="Activity chart as an extra image", elem_id=eid("chart"))
            folder = gr.Textbox("", label="Shield folder (under models/shields/, or an allowed absolute path; "
                                          "empty = none)", elem_id=eid("folder"))
            with gr.Row():
                hist = gr.Checkbox(False, label="History (repel from earlier outputs of this session)",
                                   elem_id=eid("history"))
                hist_name = gr.Textbox(DEFAULT_HISTORY, label="History name", elem_id=eid("history_name"))
                clear = gr.Button("Clear history", elem_id=eid("clear"))
            status = gr.HTML("", elem_id=eid("status"))
            coupling = gr.Dropdown(list(COUPLINGS), value="off", label="Start coupling (EDDY: spread a batch's "
                                   "starting noises, each image keeps exact N(0, I) noise)", elem_id=eid("coupling"))
            init_shield = gr.Dropdown(list(INIT_CHOICES), value=INIT_LEAVE, visible=is_img2img,
                                      label="Input image inside a shield", elem_id=eid("init_image_shield"),
                                      info="leave it: the output is moved at least the radius away from that shield; "
                                           "exclude it: that shield is left out, to edit a protected image freely")

        clear.click(fn=lambda name: f"<p>{history.clear(str(name).strip())} latents dropped from history "
                                    f"'{str(name).strip() or 'all'}'</p>", inputs=[hist_name], outputs=[status])

        controls = [enabled, radius, overcomp, intra, hist, hist_name, start, end, exact, folder, allow, coupling,
                    chart, init_shield]
        names = ["enabled", "radius_rms", "overcompensation", "intra_batch", "history", "history_name",
                 "start_percent", "end_percent", "exact", "shield_folder", "allow_unshielded", "start_coupling",
                 "activity_chart", "init_image_shield"]
        pasted = {"enabled", "radius_rms", "overcompensation", "intra_batch", "history", "history_name",
                  "start_percent", "end_percent", "exact", "shield_folder", "start_coupling", "init_image_shield"}
        self.infotext_fields = [(c, (lambda d, n=n: infotext.read(d).get(n, gr.update())))
                                for c, n in zip(controls, names) if n in pasted]
        self.paste_field_names = [infotext.RADIUS, infotext.OVERCOMPENSATION, infotext.INTRA_BATCH,
                                  infotext.HISTORY, infotext.WINDOW, infotext.EXACT, infotext.SHIELDS,
                                  infotext.COUPLING, infotext.INIT_IMAGE]
        return controls

    def process(self, p, *args):
        ShieldedProcessing.begin(p, ShieldedSettings.from_args(*args))

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = ShieldedProcessing.of(p)
        if state is not None:
            state.before_sampling(p, **kwargs)

    def post_sample(self, p, ps, *args):
        state = ShieldedProcessing.of(p)
        if state is not None:
            ps.samples = state.after_sampling(p, ps.samples)

    def postprocess(self, p, processed, *args):
        state = ShieldedProcessing.of(p)
        if state is not None:
            state.postprocess(p, processed)


script_callbacks.on_before_ui(register_xyz_axis)
# Automatic1111 without Forge: SPELL through the CFG denoiser's callbacks (no-ops on Forge, which uses its patcher).
script_callbacks.on_cfg_denoiser(a1111_hook.on_cfg_denoiser)
script_callbacks.on_cfg_after_cfg(a1111_hook.on_cfg_after_cfg)
