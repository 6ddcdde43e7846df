"""Per-run state of the pack's patches: created, found and dropped the same way by SPELL, DNG and particle/EDDY.

A run is one sampler run (a hires-fix or two-pass graph runs the sampler twice: two runs, two states). A patch
object is shared by every clone of its model and by every queued prompt, so it holds no run state. The patch's
wrapper around the run creates the state at the run's start and keeps it, under the patch's own key, in the
``transformer_options`` of that run's ``model_options``: ComfyUI's per-run copy, which every per-step hook receives
(PREDICT_NOISE and CALC_COND_BATCH wrappers, post-CFG functions) and which every cond batch of a step shares. Two
patches of the same kind on one model have two keys. The state is dropped when the run ends, also when it raises.

Wrapper levels (the hooks differ, the state code does not): SPELL and the noise patch wrap SAMPLER_SAMPLE (they
need the model-space latents, the noise, the mask and the final samples); DNG wraps OUTER_SAMPLE (its concept must
join the guider's conds before the host processes them).
"""
from __future__ import annotations

from contextlib import contextmanager

_ABSENT = object()


def state_key(kind: str, patch) -> str:
    """The key of one patch object's run state and wrappers, e.g. ``shielded_spell_<id>``."""
    return f"shielded_{kind}_{id(patch)}"


@contextmanager
def keep_run_state(model_options: dict, key: str, state):
    """Keep ``state`` under ``key`` in the run's ``model_options`` for the ``with`` block (the sampler run)."""
    slots = model_options.setdefault("transformer_options", {})
    outer = slots.get(key, _ABSENT)     # a run nested inside a run of the same patch gets the outer one back
    slots[key] = state
    try:
        yield state
    finally:
        if outer is _ABSENT:
            slots.pop(key, None)
        else:
            slots[key] = outer


def find_run_state(model_options: dict, key: str):
    """The state of the run in progress under ``key``, or None outside such a run (its wrapper did not run)."""
    return model_options.get("transformer_options", {}).get(key)
