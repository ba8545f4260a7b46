"""The import graph of tools/: no cycle, nothing imports main.py or a top-level script, and every
import points down the layers (a module may use its own layer and those below it)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"main", "make_case_studies", "make_cxr14_csv", "run_evidence"}

# Lowest first. Within a layer, modules may import each other (the cycle check still applies).
LAYERS = [
    ["tools", "tools.errors", "tools.files", "tools.dicom", "tools.cli"],        # building blocks, file formats
    ["tools.distributed", "tools.runtime"],                             # a run: device, precision, config
    ["tools.table"],                                                    # the input table
    ["tools.corruptions", "tools.dataset", "tools.cache", "tools.splits"],  # films to pixels
    ["tools.model", "tools.model_files"],                                                    # DenseNet-121, checkpoints
    ["tools.inference", "tools.training"],                              # model passes
    ["tools.predictions", "tools.audit"],                                              # the predictions CSV
    ["tools.stats", "tools.findings", "tools.discover", "tools.metrics", "tools.slicing", "tools.compare", "tools.calibration", "tools.selective",
     "tools.uncertainty", "tools.gradcam", "tools.image_stats", "tools.drift"],  # analyses: no figures, no files
    ["tools.figures"],                                                  # every figure
    ["tools.stages", "tools.stages.train", "tools.stages.evaluate", "tools.stages.stress",
     "tools.stages.calibrate", "tools.stages.selective", "tools.stages.case_studies",
     "tools.stages.evidence", "tools.stages.compare", "tools.stages.discover", "tools.stages.drift",
     "tools.check_data"],                                               # compute and write
    ["tools.html_report"],                                              # report.html
    ["tools.valtool"],                                                  # the whole suite
    ["tools.demo_sites", "tools.make_demo_data", "tools.bench", "tools.export_model"],        # stand-alone programs
    ["tools.cxr14", "tools.datasets", "tools.dicom_index"],             # other collections to the input CSV
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of tools/ or top-level script that ``path`` imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from tools import figures" imports the module tools.figures; "from tools.model import
            # head" imports from tools.model
            submodules = [f"{node.module}.{alias.name}" for alias in node.names
                          if f"{node.module}.{alias.name}" in LAYER]
            names = submodules or [node.module]
        else:
            continue
        found |= {n for n in names if n in LAYER or n in SCRIPTS}
    return found


GRAPH = {module_name(p): imports(p) for p in sorted((ROOT / "tools").rglob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(set(GRAPH) - set(LAYER)) == []
    assert sorted(set(LAYER) - set(GRAPH)) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    assert not GRAPH[module] & SCRIPTS, f"{module} imports a script: {sorted(GRAPH[module] & SCRIPTS)}"
    upward = sorted(t for t in GRAPH[module] if LAYER[t] > LAYER[module])
    assert upward == [], f"{module} (layer {LAYER[module]}) imports from higher layers: {upward}"


def test_no_cycle():
    state = {}  # module -> "open" while on the path, "done" once finished

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH:
                continue
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The parser sees imports inside functions and both import forms."""
    code = tmp_path / "probe.py"
    code.write_text("import tools.model\n\ndef f():\n    from main import main\n    from tools import figures\n")
    assert imports(code) == {"tools.model", "main", "tools.figures"}
