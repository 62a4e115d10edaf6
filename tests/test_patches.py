"""Run-time changes to libraries live in one module (pipeline/model/patches.py), each named there
and logged once per process; their effects are tested where they act (test_pair_packing.py,
test_zero_resume.py)."""

import ast
import logging

from transformers import AutoModelForSequenceClassification

from pipeline.model import patches
from tests.helpers import REPO


def _library_names(tree: ast.Module) -> set[str]:
    """Names a module imports from outside the project (torch, transformers, deepspeed, ...)."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and not node.module.startswith(("pipeline", "tests"))
        ):
            names |= {alias.asname or alias.name for alias in node.names}
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _patches_in(path) -> list[str]:
    """Assignments that change library code: `<library name>.attr = ...` or
    `<anything>.forward = ...`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    library = _library_names(tree)
    found = []
    for node in ast.walk(tree):
        for target in getattr(node, "targets", []):
            if isinstance(target, ast.Attribute) and (
                target.attr == "forward"
                or (isinstance(target.value, ast.Name) and target.value.id in library)
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(target)}")
    return found


def test_library_code_is_changed_only_in_the_patches_module():
    sources = [p for folder in ("pipeline", "stages") for p in (REPO / folder).rglob("*.py")]
    elsewhere = [hit for p in sources if p.name != "patches.py" for hit in _patches_in(p)]
    assert not elsewhere, (
        f"run-time changes to library code outside pipeline/model/patches.py: {elsewhere}"
    )
    inside = _patches_in(REPO / "pipeline/model/patches.py")
    assert len(inside) == 3, inside  # two forward swaps and DeepSpeed's ZeRO-3 load
    assert all(callable(getattr(patches, name)) for name in patches.PATCHES)


def test_each_patch_is_logged_once_per_process(tiny_model, caplog):
    patches._announced.discard("unpadded_scores")
    with caplog.at_level(logging.INFO, logger="pipeline.model.patches"):
        for _ in range(2):
            patches.unpadded_scores(
                AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.model.patches"]
    assert len(lines) == 1 and lines[0].startswith("patch unpadded_scores applied"), lines
