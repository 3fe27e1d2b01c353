"""The shape of the codebase: every stage a script, short enough to read in one sitting, standing alone."""
import importlib
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "flow", "verifiers", "rl", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_script_with_its_run_command_in_the_docstring(stage):
    src = (ROOT / f"{stage}.py").read_text()
    doc = src.split('"""')[1]
    assert f"python {stage}.py" in doc, stage
    assert re.search(r"^if __name__ == \"__main__\":\n    (data\.)?(cli\()?main", src, re.M), stage


@pytest.mark.parametrize("stage", ["flow", "verifiers", "rl", "evaluate"])
def test_stage_files_stay_under_600_lines(stage):
    """data.py is the exception (README, "Limits"): the dataset, label parsing, splits, h5ad I/O, the plumbing every
    stage shares (options, devices, checkpoints) and the simulators are one stage under the fixed top level."""
    n = len((ROOT / f"{stage}.py").read_text().splitlines())
    assert n <= 600, f"{stage}.py has {n} lines"


def test_data_py_does_not_grow():
    """data.py, the one long file (decided: at most 2,000 lines, its accepted features stay): the method first, then
    a fence and what no reader comes for (formats, plumbing, simulators)."""
    lines = (ROOT / "data.py").read_text().splitlines()
    assert len(lines) <= 2000, f"data.py has {len(lines)} lines"
    fence = next(i for i, l in enumerate(lines) if "a first reading stops here" in l.lower())
    assert "class Dataset" in "\n".join(lines[:fence]) and "def read_h5ad" in "\n".join(lines[fence:])


def test_the_project_stands_alone():
    """No file refers to the first version's blueprint, which is not in the repository."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), ROOT / "README.md"]
    hits = [f.name for f in files if "DESIGN" + ".md" in f.read_text()]
    assert not hits, hits


def test_the_readme_line_ranges_point_at_what_they_name():
    """'`flow.sample` (`flow.py` a-b)' in README: line a of flow.py starts sample's definition (or its decorator) and
    line b ends it (the last line before the next blank line or definition)."""
    readme = (ROOT / "README.md").read_text()
    refs = re.findall(r"`(\w+)\.([\w.]+)`\s*(?:\w+\s*)?\(`(\w+)\.py` (\d+)-(\d+)[);]", readme)
    assert len(refs) >= 12, refs
    refs = [r for r in refs if r[1] != "py"]                           # '`verifiers.py` (`verifiers.py` a-b)'
    for mod, name, mod2, a, b in refs:
        lines = (ROOT / f"{mod2}.py").read_text().splitlines()
        a, b, last = int(a), int(b), name.split(".")[-1]
        first = next(i for i in range(a - 1, b) if not lines[i].lstrip().startswith("@"))
        assert re.match(rf"\s*(def |class )?{last}\b", lines[first]), (mod, name, a, lines[first])
        indent = len(lines[first]) - len(lines[first].lstrip())
        assert b == len(lines) or not lines[b].startswith(" " * (indent + 1)), (mod, name, b)  # the body ends at b
    rewards = re.findall(r"`REWARDS` table[^()]*\(`verifiers\.py` (\d+)-(\d+)[);]", readme)     # the fork point
    lines = (ROOT / "verifiers.py").read_text().splitlines()
    assert rewards and all(lines[int(a) - 1].startswith("REWARDS = {") and lines[int(b) - 1] == "}" for a, b in rewards)


def test_the_reading_order_of_the_method_is_short():
    """README's "Where to start reading" cites the method (generator, prior, rewards, GRPO, evaluation) in under 800
    lines of code, counted from its own line ranges (which test_the_readme_line_ranges_point_at_what_they_name
    holds to the code)."""
    readme = (ROOT / "README.md").read_text()
    part = readme.split("## Where to start reading")[1].split("\n## ")[0]
    ranges = [(int(a), int(b)) for a, b in re.findall(r"\(`\w+\.py` (\d+)-(\d+)[);]", part)]
    assert len(ranges) >= 20 and all(a <= b for a, b in ranges), ranges
    assert sum(b - a + 1 for a, b in set(ranges)) < 800                   # each range once


CITED = re.compile(r"(?<![\w./])(data|flow|rl|verifiers|evaluate)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)")
CLASSES = {"Dataset": "data", "Reference": "data", "DataConfig": "data", "VelocityField": "flow", "ModelConfig": "flow",
           "FlowConfig": "flow", "Verifier": "verifiers", "RewardConfig": "verifiers", "RLConfig": "rl"}
CLASS_CITED = re.compile(rf"(?<![\w.])({'|'.join(CLASSES)})\.([A-Za-z_]\w*)")
EXTENSIONS = {"py", "pt", "h5ad", "json", "csv", "npz", "png", "txt"}          # rl.pt, data.h5ad: files, not names


def prose(path: Path) -> list:
    """(line, text) of what a reader reads as prose: all of a markdown file; a Python file's comments and strings."""
    src = path.read_text()
    if path.suffix == ".md":
        return list(enumerate(src.splitlines(), 1))
    return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type in (tokenize.COMMENT, tokenize.STRING)]


def cited_exists(mod: str, name: str) -> bool:
    """`mod.name` or `mod.Class.attr` exists: an attribute of the module or class, or an attribute the class sets
    (self.attr = ..., a registered buffer, a dataclass field)."""
    obj, src = importlib.import_module(mod), (ROOT / f"{mod}.py").read_text()
    head, _, attr = name.partition(".")
    if not hasattr(obj, head):
        return False
    if not attr or hasattr(getattr(obj, head), attr):
        return True
    return bool(re.search(rf"self\.{attr}\b[^=\n]*=|register_buffer\(\"{attr}\"|^    {attr}: ", src, re.M))


def test_every_cited_stage_name_exists():
    """Every `stage.name`, `stage.Class.attr` and `Class.attr` that README, bench/README and the code's docstrings and comments
    cite exists in the code: a renamed function leaves no stale pointer behind."""
    sys.path.insert(0, str(ROOT))
    files = [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / f"{s}.py" for s in STAGES),
             *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
    cites = lambda text: CITED.findall(text) + [(CLASSES[c], f"{c}.{a}") for c, a in CLASS_CITED.findall(text)]  # noqa
    stale = [f"{f.relative_to(ROOT)}:{line}: {mod}.{name}" for f in files for line, text in prose(f)
             for mod, name in cites(text) if name not in EXTENSIONS and not cited_exists(mod, name)]
    assert not stale, stale
