"""The install scripts' own checks import qvla_compiler names; CI never runs the scripts (they download lerobot), so
check here that every name they import still exists (install_lerobot.sh once ended in an ImportError this way)."""
import importlib
import pathlib
import re

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parent.parent / "scripts").glob("*.sh"))
_IMPORT = re.compile(r"^from (qvla_compiler[\w.]*) import (.+)$", re.MULTILINE)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_names_a_script_imports_from_qvla_compiler_exist(script):
    for module, names in _IMPORT.findall(script.read_text()):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"{script.name} imports {name} from {module}, which has no such name"
