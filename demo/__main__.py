"""``python -m demo``: run the SPELL terrain demo (see demo/spell_demo.py)."""
from demo.spell_demo import main

raise SystemExit(main())
