"""What the script does for one generation (a WebUI ``processing`` object ``p``), kept on ``p`` itself.

Order of the WebUI's calls: ``process`` (settings checked, infotext written) -> per batch of the batch count:
``process_before_every_sampling`` (first pass, then again before a hires pass: start coupling, SPELL installed)
-> sampling -> ``post_sample`` (t = 0 step, history, summary comment) -> ``postprocess`` (activity charts).
An exception raised in a script method is only logged by the WebUI, so every failure here is turned into a
visible outcome: the generation is stopped with the message, or (if the user allowed it) it continues
unshielded with the message as a comment under the image.
"""
from __future__ import annotations

import logging
from pathlib import Path

from guidance.coupling import couple_noise

from . import a1111_hook, forge_hook, infotext, shield_folder
from .settings import SCRIPT, STATE_ATTRIBUTE, SettingsError, ShieldedSettings, coupling_grid
from .spell_run import SpellRun

LOG = logging.getLogger("shielded_sampling")
ATTRIBUTE = STATE_ATTRIBUTE
XYZ_RADIUS = "shielded_sampling_radius"      # set on p by the X/Y/Z plot axis
NO_COUPLING = (f"{SCRIPT}: 'Start coupling' needs a Forge-family WebUI (Forge, reForge, Forge Neo), whose "
               f"p.modified_noise lets a script replace the starting noise; this Automatic1111 has none: set it "
               f"to 'off'")
FORGE, CALLBACKS = "forge post-CFG function", "A1111 CFG callbacks"
A1111_OPT_F = 8     # Automatic1111's processing.opt_f: pixels per latent element
STOPPED = " (generation stopped; tick 'Continue unshielded if the setup fails' to generate without protection)"


class ShieldedProcessing:
    def __init__(self, settings: ShieldedSettings, roots=None):
        self.settings = settings
        self.error: str | None = None
        self.runs = []
        self.sources: dict = {}
        self.roots = roots
        self.folder: Path | None = None
        self.hook = FORGE

    @classmethod
    def of(cls, p) -> "ShieldedProcessing | None":
        return getattr(p, ATTRIBUTE, None)

    @classmethod
    def begin(cls, p, settings: ShieldedSettings, roots=None) -> "ShieldedProcessing | None":
        override = getattr(p, XYZ_RADIUS, None)
        if override is not None:
            settings.radius_rms = float(override)
            settings.enabled = True
        if not settings.enabled and settings.start_coupling == "off":
            setattr(p, ATTRIBUTE, None)
            return None
        state = cls(settings, roots)
        setattr(p, ATTRIBUTE, state)
        try:
            settings.validate()
            if not forge_hook.has_forge_objects(p.sd_model):
                state.hook = CALLBACKS
                if settings.start_coupling != "off":
                    raise SettingsError(NO_COUPLING)
            if settings.enabled and settings.shield_folder.strip():
                state.roots = state.roots or shield_folder.webui_roots()
                state.folder = state.roots.resolve(settings.shield_folder)
            if settings.enabled and state.hook == CALLBACKS:
                state.check_callback_setup(p)
        except SettingsError as err:
            state.fail(p, str(err))
        p.extra_generation_params.update(infotext.write(settings))
        if state.error is not None and state.hook == CALLBACKS:
            refuse_sampling(p, state.error)
        return state

    def stop(self, p, message: str):
        """A failure inside a sampler callback (which the WebUI would only log): interrupt the generation and say
        so under the image, or continue unshielded with the reason if the user allowed it."""
        self.fail(p, message)
        if self.error is not None:
            p.comment(f"STOPPED, NOT SHIELDED: {self.error}")
            p.extra_generation_params[infotext.RESULT] = f"STOPPED, NOT SHIELDED: {self.error}"
            from modules import shared
            shared.state.interrupt()

    def fail(self, p, message: str):
        """Record a setup failure: stop at the next sampling pass, or continue unshielded if the user allowed it."""
        LOG.warning("%s", message)
        if self.settings.allow_unshielded:
            p.comment(f"UNSHIELDED: {message}")
            p.extra_generation_params[infotext.RESULT] = f"UNSHIELDED: {message}"
            self.settings.enabled = False
        else:
            self.error = message + STOPPED

    # -- before each sampling pass ----------------------------------------------------------------------
    def before_sampling(self, p, x=None, noise=None, **_):
        if self.hook == CALLBACKS:
            return     # Automatic1111 1.10 has no process_before_every_sampling; the callbacks create the runs
        try:
            self._before_sampling(p, x, noise)
        except SettingsError as err:
            self.fail(p, str(err))
        except Exception as err:   # the WebUI would only log it and sample unshielded: never silently
            LOG.exception("%s: setup failed", SCRIPT)
            self.fail(p, f"{SCRIPT}: setup failed: {type(err).__name__}: {err}")
        if self.error is not None and forge_hook.has_forge_objects(p.sd_model):
            forge_hook.install_refusal(p, self.error)

    def _before_sampling(self, p, x, noise):
        if self.error is not None:
            return
        s = self.settings
        hires = bool(getattr(p, "is_hr_pass", False))
        if s.start_coupling != "off" and not hires and noise is not None and noise.dim() == 4 and noise.shape[0] > 1:
            grid = coupling_grid(s.start_coupling, *noise.shape[1:])
            p.modified_noise = couple_noise(noise, grid)
            p.comment(f"{SCRIPT}: start noise coupled on a {grid}x{grid} grid across the batch of {noise.shape[0]}")
        if not s.enabled:
            return
        latent = x if x is not None else noise
        item_shape = tuple(latent.shape[1:])
        source, name = self.shield_source(p, item_shape)
        if self.runs and not self.runs[-1].finished and self.runs[-1].evaluations == 0:
            self.runs.pop()   # Forge calls this twice before a hires pass; the first install was discarded
        self.runs.append(forge_hook.install(p, s, item_shape, source, name))

    # -- Automatic1111 without Forge: runs created by the CFG callbacks -------------------------------------
    def uses_callbacks(self) -> bool:
        return self.hook == CALLBACKS and self.settings.enabled and self.error is None

    def check_callback_setup(self, p):
        """What the callback path needs, checked before sampling so a bad setting stops the generation visibly."""
        s = self.settings
        if self.folder is not None or s.history:
            a1111_hook.latent_scale(p.sd_model)
        a1111_hook.sigma_window(p.sd_model, s)
        if self.folder is not None:
            channels = int(getattr(p.sd_model, "latent_channels", 4))
            item_shape = (channels, p.height // A1111_OPT_F, p.width // A1111_OPT_F)
            shield_folder.check_shape(self.shield_source(p, item_shape)[0], item_shape)

    def callback_run(self, p, item_shape: tuple) -> "SpellRun | None":
        """The run of the sampling pass in progress: a new one at the first model evaluation of a pass."""
        if not self.uses_callbacks():
            return None
        hires = bool(getattr(p, "is_hr_pass", False))
        run = self.runs[-1] if self.runs else None
        if run is not None and not run.finished and run.item_shape == item_shape and run.hires == hires:
            return run
        s = self.settings
        source, name = self.shield_source(p, item_shape)
        shield_folder.check_shape(source, item_shape)
        scale, shift = a1111_hook.latent_scale(p.sd_model) if source is not None or s.history else (1.0, 0.0)
        run = SpellRun(s, item_shape, scale, shift, source, a1111_hook.sigma_window(p.sd_model, s), name)
        run.hires = hires
        forge_hook.attach_img2img_inputs(run, p)
        self.runs.append(run)
        return run

    def shield_source(self, p, item_shape: tuple):
        """The shield folder encoded at this pass's size (cached per size within the generation)."""
        if self.folder is None:
            return None, ""
        if item_shape not in self.sources:
            vae = shield_folder.vae_of(p.sd_model, self.hook)
            ratio = int(getattr(vae, "downscale_ratio", 8))
            width, height = item_shape[2] * ratio, item_shape[1] * ratio
            source, name, _ = shield_folder.load(self.folder, vae, width, height)
            self.sources[item_shape] = (source, name)
        return self.sources[item_shape]

    # -- after sampling ----------------------------------------------------------------------------------
    def after_sampling(self, p, samples):
        if self.settings.enabled and self.error is None and not self.runs:
            message = (f"{SCRIPT}: NOT APPLIED: no model evaluation of this generation reached SPELL (the sampler "
                       f"bypassed the WebUI's CFG denoiser)")
            LOG.warning("%s", message)
            p.comment(message)
            p.extra_generation_params[infotext.RESULT] = message
        if self.error is not None or not self.settings.enabled or not self.runs or self.runs[-1].finished:
            return samples     # stopped, continued unshielded, or nothing ran: no t = 0 step, no summary
        run = self.runs[-1]
        if getattr(samples, "already_decoded", False):
            run.finished = True
            p.comment(f"{SCRIPT}: the sampler returned decoded images, so the final t = 0 check was skipped "
                      f"(the last model evaluation was corrected)")
            return samples
        samples = run.finish(samples)
        p.comment(run.summary())
        p.extra_generation_params[infotext.RESULT] = run.result()   # this batch's images carry it in their PNG
        return samples

    def postprocess(self, p, processed):
        if not self.settings.activity_chart:
            return
        from reporting.plots import activity_chart
        for run in (r for r in self.runs if r.evaluations):
            image = activity_chart(run.report).image.convert("RGB")
            processed.images.append(image)
            processed.infotexts.append(f"{SCRIPT} activity chart: {run.report.summary()}")


def refuse_sampling(p, message: str):
    """Without a Forge patcher there is no post-CFG function to raise from: replace this generation's ``p.sample``
    (called by the WebUI outside any script wrapper) so the generation stops with ``message``."""
    def refuse(*args, **kwargs):
        raise RuntimeError(message)
    p.sample = refuse


def register_xyz_axis():
    """Add "[Shielded] SPELL radius" to the X/Y/Z plot script (called from ``on_before_ui``)."""
    from modules import scripts
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") or \
                Path(data.path).name == "xyz_grid.py":
            xyz = data.module
            break
    else:
        LOG.info("%s: no X/Y/Z plot script found; the radius axis is not added", SCRIPT)
        return
    if any(getattr(o, "label", "") == "[Shielded] SPELL radius" for o in xyz.axis_options):
        return

    def apply(p, value, _):
        setattr(p, XYZ_RADIUS, float(value))

    xyz.axis_options.append(xyz.AxisOption("[Shielded] SPELL radius", float, apply))
