"""The package layout's rules (issue 25), checked on the source: the bridges in `tf_lora.interop`
depend on the core and never the reverse, and no module grows past the size the layout allows."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tf_lora")
MAX_LINES = 420  # "no module over ~400 lines"
# Front ends on the public API that may reach the bridge; the package root imports it so that the
# PEFT directory format registers itself.
FRONT_ENDS = ("__init__.py", os.path.join("cli", ""))


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE), path


def _imported(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_core_never_imports_the_bridge():
    offenders = []
    for rel, path in _modules():
        if rel.startswith("interop" + os.sep) or rel == FRONT_ENDS[0] or rel.startswith(FRONT_ENDS[1]):
            continue
        bad = sorted({m for m in _imported(path) if m == "tf_lora.interop" or m.startswith("tf_lora.interop.")})
        if bad:
            offenders.append(f"{rel}: {bad}")
    assert not offenders, f"core modules import tf_lora.interop: {offenders}"


def test_the_rule_sees_a_core_module_that_imports_the_bridge(tmp_path):
    module = tmp_path / "core.py"
    module.write_text("def f():\n    from tf_lora.interop import peft\n")
    assert "tf_lora.interop" in set(_imported(str(module)))


def test_no_module_is_over_the_size_limit():
    sizes = {rel: sum(1 for _ in open(path, encoding="utf-8")) for rel, path in _modules()}
    over = {f"tf_lora/{rel}": n for rel, n in sizes.items() if n > MAX_LINES}
    assert len(sizes) > 50 and not over, f"modules over the limit (~400 lines; split them by concept): {over}"
