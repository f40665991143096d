"""lerobot integration tests: marked `lerobot`, skipped visibly (with the install command) when lerobot is absent.

The check looks for the packages without importing them (importing lerobot + transformers takes ~10 s), so
collecting the rest of the suite costs nothing.
"""
import importlib.util

import pytest

INSTALL = "bash scripts/install_lerobot.sh"
_MISSING = [name for name in ("lerobot", "transformers", "torchvision") if importlib.util.find_spec(name) is None]


def pytest_configure(config):
    config.addinivalue_line("markers", f"lerobot: needs lerobot 0.6.1 (install: {INSTALL}); skipped visibly without it")


def pytest_collection_modifyitems(config, items):
    if not _MISSING:
        return
    skip = pytest.mark.skip(reason=f"lerobot integration: {', '.join(_MISSING)} not installed; install with `{INSTALL}` "
                                   "(about 1.5 minutes, never touches torch)")
    for item in items:
        if "lerobot" in item.keywords:
            item.add_marker(skip)
