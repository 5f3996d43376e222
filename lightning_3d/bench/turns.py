"""Two Trainers in one process taking turns step by step, so that both see the same machine load.

On a shared machine the load changes from one second to the next; comparing two whole runs
made one after the other mixes that change into the result. Here the two runs go on at
the same time in two threads of one process, one training step each in turn: every step
of one side has a step of the other next to it, run under nearly the same load.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import lightning as L
from typing_extensions import override

from lightning_3d.bench.measure import StepTimer


class TakeTurns:
    """Whose turn it is, between two named sides.

    At the start of each training batch a side hands the turn to the other and waits to get
    it back. Every rank switches at the same points, between steps, so the collectives of
    the two runs never interleave; once a side has finished, the other has every turn.
    """

    def __init__(self, sides: tuple[str, str], timeout_s: float = 600.0) -> None:
        self.sides = sides
        self.timeout_s = timeout_s
        self._turn = sides[0]
        self._finished: set[str] = set()
        self._changed = threading.Condition()

    def _other(self, side: str) -> str:
        return self.sides[1] if side == self.sides[0] else self.sides[0]

    def wait_for_turn(self, side: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._turn == side, self.timeout_s):
                raise TimeoutError(f"{side}: the other Trainer did not hand the turn back within {self.timeout_s} s")

    def hand_over(self, side: str) -> None:
        with self._changed:
            if self._other(side) not in self._finished:
                self._turn = self._other(side)
                self._changed.notify_all()

    def finish(self, side: str) -> None:
        with self._changed:
            self._finished.add(side)
            self._turn = self._other(side)
            self._changed.notify_all()


class TurnTimer(StepTimer):
    """Hands the turn over at the start of each batch. A step lasts from getting the turn back at
    its batch's start to reaching the next batch's start: the other side's step is not in it."""

    def __init__(self, turns: TakeTurns, side: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turns, self.side = turns, side
        self.step_times: list[float] = []
        self._resumed: Optional[float] = None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._resumed is not None:
            self.step_times.append(time.perf_counter() - self._resumed)
        self.turns.hand_over(self.side)
        self.turns.wait_for_turn(self.side)
        self._resumed = time.perf_counter()


def fit_in_turns(first: tuple[str, Callable[[TurnTimer], None]], second: tuple[str, Callable[[TurnTimer], None]],
                 second_loss: Callable[[L.LightningModule], float]) -> dict[str, TurnTimer]:
    """Run ``first`` (in this thread) and ``second`` (in another), each a ``(name, fit(timer))``, in turns.

    Each ``fit`` builds its Trainer with the timer it is given among its callbacks and trains.
    ``second_loss`` reads the second side's loss after each step (the first side's module is a
    ``CausalLM``). Returns the timers by name.
    """
    (first_name, fit_first), (second_name, fit_second) = first, second
    turns = TakeTurns((first_name, second_name))
    timers = {first_name: TurnTimer(turns, first_name), second_name: TurnTimer(turns, second_name, loss_of=second_loss)}
    errors: list[BaseException] = []

    def second_side() -> None:
        try:
            turns.wait_for_turn(second_name)  # the first side sets up and reaches its first batch
            fit_second(timers[second_name])
        except BaseException as error:  # re-raised in this thread
            errors.append(error)
        finally:
            turns.finish(second_name)

    thread = threading.Thread(target=second_side, name=f"{second_name}-trainer")
    thread.start()
    try:
        fit_first(timers[first_name])
    finally:
        turns.finish(first_name)
        thread.join()
    if errors:
        raise errors[0]
    return timers
