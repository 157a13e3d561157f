import os
from pathlib import Path

import pytest

from hf_varlen_patch.cli import architecture_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_architecture_table_matches_the_registry():
    text = README.read_text()
    table = text.split("<!-- architectures:start -->")[1].split("<!-- architectures:end -->")[0].strip()
    assert table == architecture_table(), "run `hf-varlen-patch list` and paste it into README.md"


DOCS = README.parent / "docs"
#: pages whose Python blocks CI runs, with how many blocks each has at least
EXECUTED_PAGES = {"training.md": 7, "preference_rl.md": 7, "sequence_parallel.md": 1}


def python_blocks(path: Path) -> list[str]:
    return [block.split("```", 1)[0] for block in path.read_text().split("```python\n")[1:]]


@pytest.mark.parametrize("page", sorted(EXECUTED_PAGES))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    """Every Python block of the page runs, in order, in one namespace (as a reader would)."""
    import warnings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= EXECUTED_PAGES[page]
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
            monkeypatch.delenv(name)
        try:
            for i, block in enumerate(blocks):
                exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)
        finally:
            _leave_process_group()


def _leave_process_group() -> None:
    """A page that starts a process group (sequence_parallel.md, a group of one) ends it, so the
    tests after it in this worker see no distributed state."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def test_every_subpackage_is_packaged():
    """pyproject lists packages by hand: a subpackage missing there is missing from the wheel."""
    import tomllib

    root = README.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "hf_varlen_patch").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
