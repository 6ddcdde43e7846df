"""Every node has a help page where the ComfyUI front end looks for it, naming every input.

The front end fetches ``/extensions/<pack folder>/docs/<NODE_CLASS_MAPPINGS key>.md`` from the pack's
WEB_DIRECTORY (docs.comfy.org, "custom-nodes/help_page"); a node without one shows only its description.
"""
import re

import shield_harness as h


def test_every_node_has_a_help_page_naming_each_input(pack):
    web = h.PACK_ROOT / pack.WEB_DIRECTORY
    missing, stale = [], []
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = web / "docs" / f"{key}.md"
        if not page.is_file():
            missing.append(key)
            continue
        text = page.read_text(encoding="utf-8")
        inputs = [name for section in cls.INPUT_TYPES().values() if isinstance(section, dict) for name in section]
        stale += [f"{key}.{name}" for name in inputs if not re.search(rf"`{re.escape(name)}`", text)]
    assert not missing, f"no help page web/docs/<key>.md for {missing}"
    assert not stale, f"help pages do not mention these inputs: {stale}"
