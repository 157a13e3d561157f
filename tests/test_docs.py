from pathlib import Path

from hf_varlen_patch.cli import architecture_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_architecture_table_matches_the_registry():
    text = README.read_text()
    table = text.split("<!-- architectures:start -->")[1].split("<!-- architectures:end -->")[0].strip()
    assert table == architecture_table(), "run `hf-varlen-patch list` and paste it into README.md"
