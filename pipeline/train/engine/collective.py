"""The few things ranks must agree on outside the model: a number, a text, a decision taken on rank 0.

Values travel as tensors (no pickle, so no ``broadcast_object_list``) on the
process group's device. Launched alone, every call is a plain function call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.errors import DataError, UserError

_OK, _REFUSED, _FAILED = 0, 1, 2


class Collective:
    """This rank's view of the group: ``rank`` of ``world``, tensors on ``device``."""

    def __init__(self, rank: int, world: int, device: torch.device | str = "cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def number(self, value: int) -> int:
        """Rank 0's integer on every rank."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())

    def text(self, value: str | None) -> str:
        """Rank 0's text (UTF-8 bytes as a tensor) on every rank."""
        if self.world == 1:
            return value or ""
        data = list((value or "").encode("utf-8")) if self.rank == 0 else []
        size = self.number(len(data))
        buffer = torch.tensor(data if self.rank == 0 else [0] * size, dtype=torch.uint8, device=self.device)
        torch.distributed.broadcast(buffer, src=0)
        return bytes(buffer.tolist()).decode("utf-8")

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def smallest(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())

    def text_from_rank0(self, decide: Callable[[], str]) -> str:
        """Rank 0 runs ``decide``; every rank gets its text, or raises when it failed: the same one-line
        :class:`UserError` for a user's mistake, a ``RuntimeError`` naming rank 0's failure for a bug (rank 0
        raises its own exception, traceback and all)."""
        status, result, error = _OK, "", None
        if self.rank == 0:
            try:
                result = decide() or ""
            except (UserError, DataError) as exc:
                status, result, error = _REFUSED, str(exc), exc
            except Exception as exc:  # a bug: the other ranks must not wait for rank 0 forever
                status, result, error = _FAILED, f"{type(exc).__name__}: {exc}", exc
        status = self.number(status)
        result = self.text(result)
        if error is not None:
            raise error
        if status == _REFUSED:
            raise UserError(result)
        if status == _FAILED:
            raise RuntimeError(f"rank 0 failed: {result}")
        return result

    def on_rank0(self, act: Callable[[], Any]) -> None:
        """Rank 0 acts; every rank returns together, or raises as :meth:`text_from_rank0` says."""

        def run() -> str:
            act()
            return ""

        self.text_from_rank0(run)
