"""Charts drawn from guided runs (SPELL activity and nearest shields, DNG posterior); host-free. The run records
they draw live in ``guidance/spell_record.py``."""
