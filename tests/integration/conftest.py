"""Integration tests run inside a real ComfyUI found through COMFYUI_PATH; skipped with a reason without it."""
import pytest

import shield_harness as harness


def pytest_collection_modifyitems(config, items):
    if harness.comfy_path() is not None:
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set to a ComfyUI checkout: real-host integration tests skipped")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_nodes():
    return harness.boot_comfy()


@pytest.fixture(scope="session")
def pack(comfy_nodes):
    return harness.load_pack()


@pytest.fixture(scope="session")
def tiny_model(comfy_nodes):
    return harness.tiny_model()


@pytest.fixture(scope="session")
def spell_nodes(pack):
    return harness.pack_submodule("nodes.spell_nodes")
