"""Copies marked `# Copied from <module>.<Name>[.<member>] [with Old->New[, Old2->New2]]` stay identical to their source.

Model folders are shipped as Hub remote code and must not import hfcap, so code that several of them need (the
transformers-version compat, `shift_tokens_right`, the `generate` and `save_pretrained` overrides, ...) is copied into
each, as transformers does (`utils/check_copies.py`). The marker sits on the line directly above the copied `def`,
`class` or assignment (an assignment's copy includes the docstring line right after it); `with A->B` renames
identifiers in the source before comparing. `python tests/test_copies.py --fix` rewrites every copy from its source.
"""

import ast
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<target>[\w.]+)(?: with (?P<renames>.+))?\s*$")


def _statement_lines(body: list[ast.stmt], index: int) -> tuple[int, int]:
    """1-based first and last line of `body[index]` (decorators included), plus a docstring right after an assignment."""
    node = body[index]
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    last = node.end_lineno
    following = body[index + 1] if index + 1 < len(body) else None
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(following, ast.Expr) and isinstance(
        getattr(following, "value", None), ast.Constant
    ) and isinstance(following.value.value, str):
        last = following.end_lineno
    return first, last


def _statement_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _source_text(target: str) -> str:
    """The dedented source of `target` = `package.module.Name[.member...]`."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:split]))
        except ModuleNotFoundError:  # a name inside a module, not a module
            continue
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            break
    else:
        raise LookupError(f"no module in {target!r}")
    lines = Path(spec.origin).read_text(encoding="utf-8").splitlines()
    body = ast.parse("\n".join(lines)).body
    for depth, name in enumerate(parts[split:]):
        index = next((i for i, node in enumerate(body) if _statement_name(node) == name), None)
        if index is None:
            raise LookupError(f"{target!r}: {name!r} not found in {spec.origin}")
        if depth == len(parts) - split - 1:
            first, last = _statement_lines(body, index)
            return textwrap.dedent("\n".join(lines[first - 1 : last]))
        body = body[index].body
    raise AssertionError("unreachable")


def _rename(text: str, renames: str | None) -> str:
    for rename in (renames or "").split(","):
        if rename.strip():
            old, new = (part.strip() for part in rename.split("->"))
            text = re.sub(rf"\b{re.escape(old)}", new, text)
    return text


def find_copies() -> list[dict]:
    """Every marked copy under hfcap/: file, marker line, target, the copy's text and its source's (renamed) text."""
    copies = []
    for path in sorted((ROOT / "hfcap").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        starts = {}  # first line of every statement (at any nesting depth) -> (body, index)

        def index_body(body):
            for i, node in enumerate(body):
                starts[_statement_lines(body, i)[0]] = (body, i)
                if isinstance(node, ast.ClassDef):
                    index_body(node.body)

        index_body(ast.parse("\n".join(lines)).body)
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line)
            if not match:
                continue
            if number + 1 not in starts:
                raise AssertionError(f"{path}:{number}: the marker is not directly above a def, class or assignment")
            first, last = _statement_lines(*starts[number + 1])
            copies.append({
                "path": path, "marker_line": number, "first": first, "last": last, "indent": match["indent"],
                "target": match["target"],
                "copy": textwrap.dedent("\n".join(lines[first - 1 : last])),
                "source": _rename(_source_text(match["target"]), match["renames"]),
            })
    return copies


def fix_copies() -> int:
    """Rewrite every copy that differs from its source; returns how many were rewritten."""
    fixed = 0
    for path in sorted({copy["path"] for copy in find_copies()}):
        for copy in sorted((c for c in find_copies() if c["path"] == path), key=lambda c: -c["first"]):
            if copy["copy"] == copy["source"]:
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            replacement = textwrap.indent(copy["source"], copy["indent"]).splitlines()
            lines[copy["first"] - 1 : copy["last"]] = replacement
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            fixed += 1
    return fixed


COPIES = find_copies()


@pytest.mark.parametrize("copy", COPIES, ids=[f"{c['path'].relative_to(ROOT)}:{c['marker_line']}" for c in COPIES])
def test_marked_copy_is_identical_to_its_source(copy):
    assert copy["copy"] == copy["source"], (
        f"{copy['path']}:{copy['marker_line']} differs from {copy['target']}; run `python tests/test_copies.py --fix`"
    )


def test_every_model_folder_carries_the_cache_compat():
    """Remote code cannot import hfcap.compat: every modeling file holds marked copies of the cache-name compat."""
    for modeling in sorted((ROOT / "hfcap" / "models").glob("*/modeling_*.py")):
        targets = {copy["target"] for copy in COPIES if copy["path"] == modeling}
        assert {"hfcap.compat.CACHE_NAME", "hfcap.compat.resolve_cache"} <= targets, modeling


SHARED_SOURCE = "hfcap.models.show_attend_tell.modeling_show_attend_tell"
SHARED_PIECES = [
    "shift_tokens_right",
    "create_timm_backbone",
    "init_timm_module",
    "check_visual_inputs",
    "check_token_ids",
    "check_encoder_hidden_states",
    "ShowAttendTellEncoder.get_image_features",
    "ShowAttendTellPreTrainedModel.backbone",
    "ShowAttendTellPreTrainedModel.get_image_features",
    "ShowAttendTellPreTrainedModel.save_pretrained",
    "ShowAttendTellPreTrainedModel.generate",
]
"""What every self-contained model folder needs beyond the compat: Show-Attend-Tell's modeling file defines them, the
other modeling files carry marked copies."""


def test_every_model_folder_carries_the_shared_pieces():
    source = ROOT / "hfcap" / "models" / "show_attend_tell" / "modeling_show_attend_tell.py"
    for modeling in sorted((ROOT / "hfcap" / "models").glob("*/modeling_*.py")):
        if modeling == source:
            continue
        targets = {copy["target"] for copy in COPIES if copy["path"] == modeling}
        missing = [piece for piece in SHARED_PIECES if f"{SHARED_SOURCE}.{piece}" not in targets]
        assert not missing, f"{modeling.relative_to(ROOT)} lacks marked copies of {missing}"


def test_a_changed_copy_is_detected(tmp_path, monkeypatch):
    """The checker itself: a copy that drifts from its source is reported, and `--fix` restores it."""
    package = tmp_path / "hfcap" / "models" / "toy"
    package.mkdir(parents=True)
    (tmp_path / "hfcap" / "__init__.py").write_text("")
    (tmp_path / "hfcap" / "models" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "source.py").write_text('LIMIT = 3\n"""The limit."""\n\n\ndef twice(x):\n    return 2 * x\n')
    (package / "copy.py").write_text(
        "# Copied from hfcap.models.toy.source.LIMIT\nLIMIT = 4\n\"\"\"The limit.\"\"\"\n\n\n"
        "# Copied from hfcap.models.toy.source.twice with twice->double\ndef double(x):\n    return 2 * x\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name == "hfcap" or name.startswith("hfcap.")]:
        monkeypatch.delitem(sys.modules, name)
    copies = find_copies()
    assert [(c["target"], c["copy"] == c["source"]) for c in copies] == [
        ("hfcap.models.toy.source.LIMIT", False),
        ("hfcap.models.toy.source.twice", True),
    ]
    assert fix_copies() == 1
    assert all(c["copy"] == c["source"] for c in find_copies())
    assert (package / "copy.py").read_text().startswith("# Copied from hfcap.models.toy.source.LIMIT\nLIMIT = 3\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        print(f"rewrote {fix_copies()} copies")
    else:
        stale = [c for c in COPIES if c["copy"] != c["source"]]
        for c in stale:
            print(f"{c['path']}:{c['marker_line']}: differs from {c['target']}")
        sys.exit(1 if stale else 0)
