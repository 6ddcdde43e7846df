"""The SPELL run record as the nodes, the WebUI and ``reporting.plots`` import it.

Defined once in ``guidance/spell_record.py``, so the sampler API (``guidance.sampling.SpellWrapper``) emits the
very type the nodes emit and the same charts draw both; this module only names it for the host-side code.
"""
try:  # inside ComfyUI the pack is one package; in the WebUI, the CLI and the tests guidance/ is a top-level sibling
    from ..guidance.spell_record import FINAL_JUMP_NOTE, INSIDE_RTOL, OutputRecord, SpellReport, StepRecord, step_record
except ImportError:
    from guidance.spell_record import FINAL_JUMP_NOTE, INSIDE_RTOL, OutputRecord, SpellReport, StepRecord, step_record

__all__ = ["FINAL_JUMP_NOTE", "INSIDE_RTOL", "OutputRecord", "SpellReport", "StepRecord", "step_record"]
