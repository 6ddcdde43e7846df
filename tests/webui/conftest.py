"""Tests of the Automatic1111 / Forge extension against a real WebUI tree.

Set WEBUI_PATH to a reForge or Forge tree (e.g. ../shared/hosts/reforge-2026-03) and run with a venv from
tests/host/setup_webui.sh; without it every test here is skipped with that reason.
"""
from __future__ import annotations

import pytest

import webui_harness

REASON = ("WEBUI_PATH is not set to an Automatic1111-family WebUI tree (e.g. ../shared/hosts/reforge-2026-03); "
          "build its venv with tests/host/setup_webui.sh and run these tests with that venv")


def pytest_collection_modifyitems(config, items):
    if webui_harness.webui_path() is None:
        skip = pytest.mark.skip(reason=REASON)
        for item in items:
            if "tests/webui/" in str(item.fspath).replace("\\", "/"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    if webui_harness.webui_path() is None:
        pytest.skip(REASON)
    shared = webui_harness.boot(tmp_path_factory.mktemp("webui-data"))
    return shared


@pytest.fixture(scope="session")
def script_module(webui):
    return webui_harness.load_script()
