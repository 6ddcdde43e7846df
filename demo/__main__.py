"""``python -m demo``: the demo itself (see demo/spell_demo.py); needs the demo's venv, which demo/run.sh makes."""
try:
    from demo.spell_demo import main
except ImportError as err:          # outside .venv-demo: say how to run it instead of a traceback
    raise SystemExit(f"demo: {err}. Run `bash demo/run.sh` (or `python demo/run.py`), which makes the demo's venv "
                     f"and installs what it needs; `bash demo/run.sh --help` lists the options.") from None

raise SystemExit(main())
