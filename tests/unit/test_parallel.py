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
