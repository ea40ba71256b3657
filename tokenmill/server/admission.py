"""Admission at the door: a full server answers 429 from the event loop, before any work is queued.

The scheduler's own bound (``--max-queue`` waiting sequences) is checked on
the engine thread, so a request refused there has waited for the step in
progress (seconds, under load) and for its prompts to be tokenized. Here the
event loop keeps its own count of sequences: those in the engine (added and
not finished, ``AsyncEngine.num_seqs_in_flight``) plus those admitted and
still being tokenized (reserved). A request whose sequences would take the
count past what can wait plus what can run (``--max-queue`` +
``--max-num-seqs``) gets 429 at once. A request that could never fit — more
sequences (``n`` times the prompts) than the waiting queue holds, since all
of a request's sequences enter it together — is a 400, not a 429 forever.

The scheduler's check stays as the last word (e.g. when KV memory, not
``--max-num-seqs``, limits what runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics


class _InFlight(Protocol):
    @property
    def num_seqs_in_flight(self) -> int: ...


class Admission:
    def __init__(
        self,
        engine: _InFlight,
        max_waiting: int | None,
        max_running: int,
        metrics: ServerMetrics,
        retry_after_s: int,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting  # None: unbounded, nothing is refused here
        self.capacity = None if max_waiting is None else max_waiting + max_running
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.num_reserved = 0  # admitted sequences not yet in the engine

    def check_fits(self, num_seqs: int, param: str) -> None:
        """400 for a request with more sequences than the waiting queue can ever hold."""
        if self.max_waiting is not None and num_seqs > self.max_waiting:
            self.metrics.reject("request_too_large")
            raise APIError(
                400,
                f"the request asks for {num_seqs} sequences (n times the number of prompts); this server queues "
                f"at most {self.max_waiting} (--max-queue), so it could never be served",
                param=param,
                code="request_too_large",
            )

    @contextlib.contextmanager
    def reserve(self, num_seqs: int) -> Iterator[Reservation]:
        """Hold room for ``num_seqs`` sequences while the request is prepared; 429 if there is none.

        Release the reservation (``Reservation.release``) the moment the
        sequences are handed to the engine, where ``num_seqs_in_flight``
        counts them; it is released on exit in any case.
        """
        if self.capacity is not None and self.engine.num_seqs_in_flight + self.num_reserved + num_seqs > self.capacity:
            self.metrics.reject("queue_full")
            raise APIError(
                429,
                f"the server is full ({self.capacity} sequences running or waiting); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        reservation = Reservation(self, num_seqs)
        try:
            yield reservation
        finally:
            reservation.release()


class Reservation:
    def __init__(self, admission: Admission, num_seqs: int) -> None:
        self._admission = admission
        self._num_seqs = num_seqs
        admission.num_reserved += num_seqs

    def release(self) -> None:
        self._admission.num_reserved -= self._num_seqs
        self._num_seqs = 0
