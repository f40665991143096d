"""lerobot integration tests, skipped visibly (with the install command) when their lerobot is absent.

`lerobot` tests need lerobot 0.6.1 (pi0 / pi0.5 / SmolVLA): `bash scripts/install_lerobot.sh`.
`lerobot_groot` tests need lerobot 0.4.4 (GR00T N1.5), which lives in its own folder:
`TARGET=<dir> bash scripts/install_lerobot_groot.sh`, then run pytest with `PYTHONPATH=<dir>`.
Versions are read from package metadata without importing anything (importing lerobot takes ~10–25 s).
"""
import importlib.metadata
import importlib.util

import pytest

INSTALL = "bash scripts/install_lerobot.sh"
INSTALL_GROOT = "TARGET=<dir> bash scripts/install_lerobot_groot.sh, then PYTHONPATH=<dir> pytest ..."


def _lerobot_version():
    if importlib.util.find_spec("lerobot") is None:
        return None
    try:
        return importlib.metadata.version("lerobot")
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(wanted_prefix: str) -> str | None:
    """Why the tests for lerobot `wanted_prefix`.* cannot run here, or None when they can."""
    version = _lerobot_version()
    if version is None:
        return "lerobot is not installed"
    if not version.startswith(wanted_prefix):
        return f"lerobot {version} is installed, these tests need {wanted_prefix}x"
    gone = [n for n in ("transformers", "torchvision") if importlib.util.find_spec(n) is None]
    return f"{', '.join(gone)} not installed" if gone else None


def pytest_configure(config):
    config.addinivalue_line("markers", f"lerobot: needs lerobot 0.6.1 (install: {INSTALL}); skipped visibly without")
    config.addinivalue_line("markers", f"lerobot_groot: needs lerobot 0.4.4 (install: {INSTALL_GROOT}); skipped "
                                       "visibly without")


def pytest_collection_modifyitems(config, items):
    why = {"lerobot": _missing("0.6."), "lerobot_groot": _missing("0.4.")}
    how = {"lerobot": f"`{INSTALL}` (about 1.5 minutes, never touches torch)",
           "lerobot_groot": f"`{INSTALL_GROOT}` (about 3 minutes, never touches torch)"}
    for item in items:
        for marker, reason in why.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{marker} integration: {reason}; install with {how[marker]}"))
