"""The install scripts' own checks import qvla_compiler names; CI never runs the scripts (they download lerobot), so
check here that every name they import still exists (install_lerobot.sh once ended in an ImportError this way)."""
import importlib
import pathlib
import re

import pytest

_IMPORT = re.compile(r"^from (qvla_compiler[\w.]*) import (.+)$", re.MULTILINE)
SCRIPTS = [p for p in sorted((pathlib.Path(__file__).parent.parent / "scripts").glob("*.sh"))
           if _IMPORT.search(p.read_text())]  # the ones that import something from qvla


def test_the_install_scripts_are_checked():
    assert {p.name for p in SCRIPTS} >= {"install_lerobot.sh", "install_lerobot_groot.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_names_a_script_imports_from_qvla_compiler_exist(script):
    for module, names in _IMPORT.findall(script.read_text()):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"{script.name} imports {name} from {module}, which has no such name"
