import types

args = types.SimpleNamespace(cpu=False)
