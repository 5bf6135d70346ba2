"""The shape of the code: imports point one way, nothing imports in a circle, the training step is
written once, and the precision converter leaves exactly the declared high-precision modules alone."""
import ast
from pathlib import Path

import pytest
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project (its own modules always). Entry points and scripts/
# sit above all of them: entry points -> training -> inference -> data -> models / flow; app -> inference.
ALLOWED = {
    "models": set(),
    "flow": set(),
    "data": {"models"},
    "inference": {"data", "models", "flow"},
    "training": {"inference", "data", "models", "flow"},
    "app": {"inference", "models", "flow"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ALLOWED}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py")}
    # "from models import checkpoint" names a module; "from models.checkpoint import x" names its attribute
    return {name: {m for m in _project_imports(path) if m in modules} | {m.rsplit(".", 1)[0] for m in _project_imports(path)
                                                                          if m not in modules and m.rsplit(".", 1)[0] in modules}
            for name, path in modules.items()}


def test_imports_point_one_way():
    wrong = sorted((src, dst) for src, dsts in _graph().items() for dst in dsts
                   if dst.split(".")[0] != src.split(".")[0] and dst.split(".")[0] not in ALLOWED[src.split(".")[0]])
    assert not wrong, f"imports against the layering (module -> what it imports): {wrong}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def _step_calls(path: Path) -> list[str]:
    """Functions in ``path`` that run a backward pass or an optimizer step (``x.backward(...)``, ``opt.step()``)."""
    found = []

    def walk(node, where):
        for child in ast.iter_child_nodes(node):
            inner = f"{where}.{child.name}" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and (
                    child.func.attr == "backward" or (child.func.attr == "step" and "opt" in ast.unparse(child.func.value))):
                found.append(f"{path.relative_to(ROOT)}:{where.lstrip('.')}")
            walk(child, inner)

    walk(ast.parse(path.read_text()), "")
    return found


def test_the_training_step_is_written_once():
    """training/step.py is the only place that runs backward and the optimizer step of a training step: the
    trainer and every benchmark that times one call its train_step."""
    for name in ["bench_train_step", "bench_trainer_overhead", "bench_vs_diffusers", "bench_te", "bench_cpu_bf16"]:
        assert "train_step(" in (ROOT / "scripts" / f"{name}.py").read_text(), name
    assert "train_step(" in (ROOT / "training" / "trainer.py").read_text()
    calls = {c for p in [*ROOT.glob("scripts/*.py"), *ROOT.glob("training/*.py")] for c in _step_calls(p)}
    # besides the step: the kernel floor records one forward + backward and replays AdamW's step alone;
    # bench_attention times attention kernels (forward + backward), no model; REPA's projector, a training-only
    # MLP outside the model, takes its own AdamW step after the model's (its gradient came from the step's backward);
    # train_demo_encoder trains a vision encoder, not a diffusion model
    assert calls == {"training/step.py:train_step", "scripts/bench_vs_diffusers.py:backward_once",
                     "scripts/bench_vs_diffusers.py:kernel_floor.floor", "scripts/bench_vs_diffusers.py:kernel_floor",
                     "scripts/bench_attention.py:main.time_kernel", "training/repa.py:update",
                     "scripts/train_demo_encoder.py:main"}, calls


@pytest.mark.parametrize("family, extra", [("ccdit", dict(num_classes=4)), ("mmdit", dict(caption_channels=32)),
                                           ("mmdit", dict(caption_channels=32, block="joint", micro_conditions=True))])
def test_converter_keeps_exactly_the_declared_high_precision_modules(family, extra):
    import torch

    from models.linear import MXFP8EmulatedLinear, convert, high_precision
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    model = build_model(family, model_config(family, "tiny", input_size=8, in_channels=3, **extra))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    keep = high_precision(model)
    declared = {n for n in linears if n.split(".")[0] in keep}
    assert declared and declared != linears
    convert(model, "mxfp8_emulated")
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    converted = {n for n, m in model.named_modules() if isinstance(m, MXFP8EmulatedLinear)}
    assert plain == declared and converted == linears - declared
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the same weights, only the GEMMs change
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = {"class_labels": torch.tensor([0, 1])} if family == "ccdit" else {"encoder_hidden_states": torch.randn(2, 4, 32)}
    assert torch.isfinite(model(x, t, **cond)).all()
    convert(model, "mxfp8_emulated")  # converting twice changes nothing
    assert {n for n, m in model.named_modules() if isinstance(m, MXFP8EmulatedLinear)} == converted


def test_a_model_without_a_declaration_is_refused():
    from models.linear import convert

    with pytest.raises(TypeError, match="declares no _keep_in_high_precision"):
        convert(nn.Sequential(nn.Linear(32, 32)), "mxfp8_emulated")
