"""The few things ranks must agree on outside the model: a number, a text, a decision taken on rank 0.

Values travel as small CPU tensors (no pickle, so no ``broadcast_object_list``) over
a gloo group of their own, with the run's time limit (``--ddp_timeout``). On GPUs
the model's collectives run over NCCL, whose watchdog kills a job that waits past
its limit with no word of why; a rank that waits here for rank 0 — a checkpoint
being published, an export, a decision — instead fails with one line naming what
rank 0 was doing and the flag to raise (:class:`PhaseTimeout`). Launched alone,
every call is a plain function call.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.common.process_group import distributed_env
from pipeline.errors import DataError, UserError

_OK, _REFUSED, _FAILED = 0, 1, 2


class PhaseTimeout(UserError):
    """A rank waited for rank 0 longer than ``--ddp_timeout``; the message names the phase and the flag."""


class Collective:
    """This rank's view of the group: ``rank`` of ``world``; waits bounded by ``timeout_s`` (``--ddp_timeout``)."""

    def __init__(self, rank: int, world: int, timeout_s: float | None = None):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.group = None
        if world > 1:  # every rank creates it, in the same order: at start-up
            limit = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            self.group = torch.distributed.new_group(backend="gloo", **limit)
        self._phase = "a step"  # what the ranks are doing: named in a timeout

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name the work inside (rank 0's alone, or uneven) for a wait that outlasts ``--ddp_timeout``; on rank 0,
        work that itself outlasted it is the same error (the others have given up by then)."""
        outer, self._phase = self._phase, name
        started = time.monotonic()
        try:
            yield
            if self.rank == 0 and self.world > 1 and self.timeout_s and time.monotonic() - started > self.timeout_s:
                raise self._timeout(time.monotonic() - started)
        finally:
            self._phase = outer

    def _timeout(self, waited: float | None = None) -> PhaseTimeout:
        took = f" ({waited:.0f} s)" if waited is not None else ""
        return PhaseTimeout(
            f"{self._phase}{took} took longer than --ddp_timeout {self.timeout_s:g} s, the longest one rank waits "
            "for another; raise --ddp_timeout (seconds)"
        )

    def _run(self, collective_op: Callable[..., Any], tensor: torch.Tensor, **kwargs: Any) -> None:
        """One collective op on the group; a wait past the time limit raises :class:`PhaseTimeout`."""
        try:
            collective_op(tensor, group=self.group, **kwargs)
        except RuntimeError as exc:  # gloo: "Timed out waiting …", or a peer that stopped closed the connection
            if self.timeout_s is None:
                raise
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise self._timeout() from exc
            raise RuntimeError(f"{self._phase}: another rank stopped ({exc}); its own error says why") from exc

    def barrier(self) -> None:
        if self.world > 1:
            self._run(lambda t, group: torch.distributed.all_reduce(t, group=group), torch.zeros(1))

    def number(self, value: int, src: int = 0) -> int:
        """Rank ``src``'s integer on every rank."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        self._run(torch.distributed.broadcast, tensor, src=src)
        return int(tensor.item())

    def text(self, value: str | None, src: int = 0) -> str:
        """Rank ``src``'s text (UTF-8 bytes as a tensor) on every rank."""
        if self.world == 1:
            return value or ""
        data = list((value or "").encode("utf-8")) if self.rank == src else []
        size = self.number(len(data), src)
        buffer = torch.tensor(data if self.rank == src else [0] * size, dtype=torch.uint8)
        self._run(torch.distributed.broadcast, buffer, src=src)
        return bytes(buffer.tolist()).decode("utf-8")

    def require_seen(self, sees: bool, what: str) -> None:
        """Every rank must see ``what`` as rank 0 wrote it (a folder shared by all nodes); otherwise every rank raises
        the same one line naming the first rank that does not, its host and node. Collective."""
        first = self.smallest(self.rank if not sees else self.world)
        if first >= self.world:
            return
        env = distributed_env()
        me = f"rank {self.rank} on host {socket.gethostname()} (node {env.node_rank})"
        who = self.text(me if self.rank == first else None, src=first)
        raise UserError(f"{who} does not see {what}")

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.long)
        self._run(torch.distributed.all_reduce, tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def smallest(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        self._run(torch.distributed.all_reduce, tensor, op=torch.distributed.ReduceOp.MIN)
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
