"""DDP and FSDP2 are one ``Parallelism`` strategy (``engine/parallel.py``): the trainer asks the strategy, never
the mode, and the checkpoint package never imports the strategies back."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from pipeline.train.engine import parallel, trainer

SPECIFIES = ("pipeline.train.engine.trainer",)

ENGINE = Path(parallel.__file__).parent


def test_the_strategy_follows_the_mode_and_fsdp_overrides_what_differs():
    assert type(parallel.strategy(False, None, None)) is parallel.Parallelism
    fsdp = parallel.strategy(True, None, "bf16", cpu_offload=True)
    assert isinstance(fsdp, parallel.FSDP) and fsdp.cpu_offload and fsdp.mixed_precision == "bf16"
    interface = {n for n, f in inspect.getmembers(parallel.Parallelism, inspect.isfunction) if not n.startswith("_")}
    overridden = {n for n in interface if getattr(parallel.FSDP, n) is not getattr(parallel.Parallelism, n)}
    assert overridden == interface, f"FSDP inherits DDP's {sorted(interface - overridden)}"
    assert fsdp.syncs(last=False) is False and fsdp.renders_every_row()


def test_the_trainer_has_no_mode_branch_and_stays_short():
    source = Path(trainer.__file__).read_text()
    assert len(source.splitlines()) < 300
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If | ast.IfExp):
            assert "fsdp" not in ast.unparse(node.test).lower(), ast.unparse(node.test)


def test_nothing_in_checkpoint_imports_the_strategies():
    for path in (ENGINE / "checkpoint").glob("*.py"):
        assert "engine.parallel" not in path.read_text() and "engine import parallel" not in path.read_text(), path


# the steps of a resume: only the checkpoint manager takes them (the trainer and the data-only run ask it once)
RESUME_STEPS = {"choose_intact", "read_marker", "marker_or_none", "check_mode", "adopt", "truncate_trace"}


def resume_steps_called(source: str) -> set[str]:
    called = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in RESUME_STEPS:
                called.add(name)
    return called


def test_a_runs_resume_is_spelled_out_once_in_the_checkpoint_manager():
    """The trainer and ``--data_only`` each spelled out the resume (which checkpoint, its marker, mode and recipe,
    the lineage, the parts, the trace); now the manager does it and they ask it."""
    from pipeline.train.engine import data_only
    from pipeline.train.engine.checkpoint import manager

    for module in (trainer, data_only):
        assert resume_steps_called(Path(module.__file__).read_text()) == set(), module.__name__
    assert resume_steps_called(Path(manager.__file__).read_text()) >= {"choose_intact", "check_mode", "adopt",
                                                                        "truncate_trace", "read_marker"}  # fmt: skip
    assert resume_steps_called("def f(c):\n    c.run.adopt(m)\n    truncate_trace(p, 3)\n") == {
        "adopt",
        "truncate_trace",
    }
