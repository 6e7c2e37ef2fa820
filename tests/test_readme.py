"""README's reading path ("Read the method") points at the code it names.

Each row `file.py: name, name ...` with lines `a-b` must hold every named function or class
whole (a `(header)` entry: the file's docstring), `A … B` names the first and last of a run of
definitions, and the whole path stays a one-sitting read (at most 900 lines).
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^\| *\d+ *\| *`(?P<file>\w+\.py): (?P<names>[^`]+)` *\| *(?P<a>\d+)-(?P<b>\d+) *\|")


def reading_path():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Read the method", 1)[1].split("\n## ", 1)[0]
    rows = [m.groupdict() for m in map(ROW.match, section.splitlines()) if m]
    assert rows, "README.md: no reading-path rows under '## Read the method'"
    return rows


def definitions(path):
    """name -> (first line, last line) of every top-level def/class and every method."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno)
            for sub in getattr(node, "body", []):
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = (sub.lineno, sub.end_lineno)
    if ast.get_docstring(tree) is not None:
        out["(header)"] = (1, tree.body[0].end_lineno)
    return out


def test_every_reading_path_row_holds_the_code_it_names():
    for row in reading_path():
        path, a, b = os.path.join(ROOT, row["file"]), int(row["a"]), int(row["b"])
        defs = definitions(path)
        names = [n.strip() for n in re.split(r"[,…]", row["names"]) if n.strip()]
        assert names, row
        for name in names:
            assert name in defs, f"README reading path: {row['file']} has no {name}"
            first, last = defs[name]
            assert a <= first and last <= b, (
                f"README reading path: {row['file']}: {name} is at lines {first}-{last}, "
                f"outside the {a}-{b} the README gives")


def test_the_reading_path_is_one_sitting():
    total = sum(int(r["b"]) - int(r["a"]) + 1 for r in reading_path())
    assert total <= 900, f"README's reading path is {total} lines (at most 900)"
