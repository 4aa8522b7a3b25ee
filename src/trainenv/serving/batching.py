"""Adaptive batching of ``/invocations`` (opt-in: ``TRAINENV_SERVING_MAX_BATCH_SIZE`` > 1).

Each request runs in its own request thread, in three steps:

1. its own ``input_fn`` (or the default decoder), in a handler slot of the app's pool;
2. ``Batcher.predict``: it joins the open batch and waits, **holding no handler slot**;
3. its own ``output_fn`` (or the default encoder), in a handler slot again.

The first request of a batch leads it: it waits up to ``max_batch_delay_ms`` (less when the
batch fills up to ``max_batch_size``), then takes a handler slot and runs
``predict_batch_fn(inputs, model)`` once for everyone. Requests arriving while it waits for a
free slot still join, up to the maximum (the pool hands slots out first come, first served, so
the requests queued ahead of the leader decode and join before it runs), so under load batches
grow by themselves; with a delay of 0 a request never waits on purpose and batches form only
while every slot is busy. A batch
is one handler call: it counts once against ``threads``, and the watchdog's 504 for an overrun
goes to the leader's connection.

Each request gets its own item of the result: a prediction, or the exception that item is
(``trainenv.serving.handler.batch_item``). When ``predict_batch_fn`` raises or returns a list
of the wrong length, every request of the batch fails with that error; when no slot frees in
time, or the pool is saturated, every request of the batch gets the leader's 504 or 503. A
request whose own deadline passes while it waits for the batch answers 504 (the batch goes on).

The app hands ``/invocations`` to ``Batcher.run`` instead of the pool's ``run`` (same contract).
The KServe v2 and Vertex routes are never batched. ``check(env, hooks)`` refuses, at start-up,
batching with a handler that has no ``predict_batch_fn``.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

    from trainenv.serving.api import RequestContext
    from trainenv.serving.config import ServingEnv
    from trainenv.serving.handler import Answer, Handler, Hooks
    from trainenv.serving.pool import InlineRunner

from trainenv.errors import ConfigError
from trainenv.serving.api import HTTPError
from trainenv.serving.handler import HookError, batch_item
from trainenv.serving.pool import AlreadyAnswered, DeadlineExceeded, Saturated


def check(env: ServingEnv, hooks: Hooks) -> None:
    """``ConfigError`` naming the variable when batching is on and the handler cannot batch."""
    if env.max_batch_size > 1 and hooks.get("predict_batch_fn") is None:
        where = env.sources.get("max_batch_size", "TRAINENV_SERVING_MAX_BATCH_SIZE")
        has = "transform_fn" if hooks.get("transform_fn") is not None else "no predict_batch_fn"
        raise ConfigError.at(
            where,
            None,
            f"{env.max_batch_size} needs predict_batch_fn(inputs, model) in the handler (it has {has}); "
            "define it, or set 1 for no batching",
        )


def for_app(env: ServingEnv, handler: Handler, pool: InlineRunner) -> Batcher | None:
    """The app's batcher, or ``None`` when batching is off (or the handler cannot batch)."""
    if env.max_batch_size > 1 and handler.hooks.get("predict_batch_fn") is not None:
        return Batcher(handler, pool, env.max_batch_size, env.max_batch_delay_ms)
    return None


class _Batch:
    """The requests gathered into one ``predict_batch_fn`` call, and its outcome."""

    __slots__ = ("inputs", "contexts", "closed", "done", "predictions", "error")

    def __init__(self) -> None:
        self.inputs: list[Any] = []
        self.contexts: list[RequestContext | None] = []
        self.closed = False  # no more requests may join
        self.done = threading.Event()
        self.predictions: list[Any] | None = None
        self.error: BaseException | None = None

    def outcome(self, index: int) -> Any:
        """Request ``index``'s prediction, or its error raised (a fresh one per request)."""
        error = self.error
        if error is None:
            assert self.predictions is not None
            return batch_item(self.predictions[index])
        if isinstance(error, HookError):
            raise HookError(error.hook, error.error)
        if isinstance(error, HTTPError):
            raise HTTPError(error.status, error.message, code=error.code, headers=dict(error.headers))
        raise type(error)()  # Saturated or DeadlineExceeded: the batch never ran


class Batcher:
    """Gathers concurrent ``/invocations`` predictions into ``predict_batch_fn`` calls (see the module docstring)."""

    def __init__(self, handler: Handler, pool: InlineRunner, max_size: int, delay_ms: float) -> None:
        self.handler = handler
        self.pool = pool
        self.max_size = max_size
        self.delay_s = delay_ms / 1000.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._open: _Batch | None = None

    def run(
        self, fn: Callable[..., Answer], args: tuple[Any, ...], deadline: float, on_timeout: Callable[[], None]
    ) -> Answer:
        """``InlineRunner.run`` for ``Handler.invoke(*args)``, its prediction batched (any other ``fn``
        goes to the pool as it is); raises what ``InlineRunner.run`` raises."""
        handler = self.handler
        if fn != handler.invoke:
            return self.pool.run(fn, args, deadline, on_timeout)
        body, media_type, params, accept, context = args
        data = self.pool.run(handler.decode, (body, media_type, params, context), deadline, on_timeout)
        prediction = self.predict(data, context, deadline, on_timeout)
        return self.pool.run(handler.respond, (prediction, accept, context), deadline, on_timeout)

    def predict(self, data: Any, context: RequestContext | None, deadline: float, on_timeout: Callable[[], None]) -> Any:
        """Join the open batch (or open one and lead it); this request's prediction."""
        with self._lock:
            batch = self._open
            leader = batch is None
            if batch is None:
                batch = self._open = _Batch()
            index = len(batch.inputs)
            batch.inputs.append(data)
            batch.contexts.append(context)
            if index + 1 >= self.max_size:
                self._close(batch)
            elif leader and self.delay_s > 0:
                until = time.monotonic() + min(self.delay_s, max(0.0, deadline - time.monotonic()))
                while not batch.closed:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
        if not leader:
            if not batch.done.wait(max(0.0, deadline - time.monotonic())):
                raise AlreadyAnswered()  # the app answers 504; the batch goes on without us
            return batch.outcome(index)
        try:
            self.pool.run(self._run, (batch,), deadline, on_timeout)
        except (Saturated, DeadlineExceeded) as exc:  # never ran: the whole batch shares the answer
            with self._lock:
                self._close(batch)
            batch.error = exc
            batch.done.set()
            raise
        return batch.outcome(index)

    def _close(self, batch: _Batch) -> None:
        """Called with the lock held: no request joins ``batch`` from now on."""
        batch.closed = True
        if self._open is batch:
            self._open = None
        self._changed.notify_all()

    def _run(self, batch: _Batch) -> None:
        """In a handler slot: close the batch, call ``predict_batch_fn``, hand out the outcome."""
        with self._lock:
            self._close(batch)
        try:
            batch.predictions = self.handler.predict_batch(batch.inputs, batch.contexts)
        except BaseException as exc:  # noqa: BLE001 - every request of the batch gets it
            batch.error = exc if isinstance(exc, (HookError, HTTPError)) else HookError("predict_batch_fn", exc)
        finally:
            batch.done.set()
