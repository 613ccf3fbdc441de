"""What a wheel ships: every sub-package of the source tree is listed in pyproject.toml (an editable install
finds an unlisted one anyway, so only a real install would miss it)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "atlasseg").rglob("__init__.py")}
    assert found and found <= listed, sorted(found - listed)
