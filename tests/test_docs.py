"""The generated references (docs/configuration.md, docs/cli.md) match the code, and every config key is documented."""

import dataclasses
import platform
import re
from pathlib import Path

import pytest

from atlasseg import docs
from atlasseg.config import Config

DOCS = Path(__file__).resolve().parent.parent / "docs"
STALE = "{} is out of date with the code: regenerate it with `python -m atlasseg.docs` and commit it"


def test_configuration_reference_is_in_sync():
    assert (DOCS / "configuration.md").read_text() == docs.configuration_reference(), STALE.format(
        "docs/configuration.md"
    )


def test_cli_reference_is_in_sync():
    text = (DOCS / "cli.md").read_text()
    made_with = re.search(r"with Python (\d+\.\d+)", text)[1]
    if made_with != ".".join(platform.python_version_tuple()[:2]):
        pytest.skip(f"docs/cli.md was generated with Python {made_with}, whose argparse formats help differently")
    assert text == docs.cli_reference(), STALE.format("docs/cli.md")


def test_every_config_key_is_documented_in_its_class_docstring():
    assert docs.undocumented() == [], "document these in the class's numpydoc Parameters section (name : type, unit)"


def test_an_undocumented_or_stale_key_is_found():
    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section.

        Parameters
        ----------
        width, height : float, mm
            Size of the box.
        gone : int
            No longer a field.

        Notes
        -----
        depth : int
            Not in Parameters.
        """

        width: float = 1.0
        height: float = 2.0
        depth: int = 3

    @dataclasses.dataclass(frozen=True)
    class Root:
        box: Section = dataclasses.field(default_factory=Section)

    assert docs.parameters(Section)["height"] == docs.Parameter("float", "mm", "Size of the box.")
    assert docs.undocumented(Root) == ["box.depth", "box.gone (documented, not a field)"]


def test_reference_lists_every_key_with_its_default():
    text = docs.configuration_reference()
    keys = []

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                leaves(value, f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key}")

    leaves(Config().to_dict())
    assert len(keys) > 40 and all(f"| `{key}` |" in text for key in keys)
    assert "| `selection.k` | int or 'all' | `10` |" in text
    assert "| `registration.affine.smoothing_sigmas` | list of float | `[1.0, 0.0]` | mm |" in text


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    assert docs.main(["--out", str(tmp_path)]) == 0
    assert docs.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "cli.md").write_text("old\n")
    assert docs.main(["--out", str(tmp_path), "--check"]) == 1
    assert "cli.md; run `python -m atlasseg.docs`" in capsys.readouterr().err
    assert (tmp_path / "cli.md").read_text() == "old\n"
