"""Shield Set Loader in the real ComfyUI: damage to its database while the host holds the set is noticed.

ComfyUI re-runs a node only when ``IS_CHANGED`` returns something new. The image folder did not change, so
the fingerprint must also cover the database's committed state (issue 13, item 10).
"""
import os

import numpy as np
import pytest

from test_shield_loader_comfy import SIZE, load, loader, shields_root, tiny_vae, write_images  # noqa: F401 (fixtures)


def is_changed(loader, folder):
    return loader.ShieldSetLoader.IS_CHANGED(folder, SIZE, SIZE, "center-crop", 4, False)


def test_shard_damaged_while_the_set_is_held_makes_the_node_run_again(comfy_nodes, loader, tiny_vae, shields_root):
    rng = np.random.default_rng(5)
    write_images(shields_root / "held", [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)])
    shield_set, _ = load(loader, "held", tiny_vae)
    assert len(shield_set) == 4
    before = is_changed(loader, "held")
    assert is_changed(loader, "held") == before  # nothing changed: ComfyUI keeps the cached set
    shard = next((shields_root / "held" / ".shield_db").glob("*/shards/*.safetensors"))
    st = shard.stat()
    with open(shard, "r+b") as handle:  # flip one latent byte in place; size and mtime stay as they were
        handle.seek(st.st_size - 5)
        byte = handle.read(1)
        handle.seek(st.st_size - 5)
        handle.write(bytes([byte[0] ^ 0x10]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert is_changed(loader, "held") != before  # ComfyUI runs the node again ...
    with pytest.raises(ValueError, match=f"{shard.name} is corrupt"):  # ... which refuses the damaged shard, naming it
        load(loader, "held", tiny_vae)
