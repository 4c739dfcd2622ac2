"""The engine in a process of its own, so HTTP work and the step loop run on two cores.

In one process the aiohttp handlers (parsing, JSON, tokenizing, SSE) and the engine's step loop
(scheduling, batching, sampling, detokenizing) take turns on one interpreter lock. With a small
model the per-request HTTP work is as large as the engine's, so the two halves serialise and
HTTP throughput falls far below what the engine alone sustains. SGLang and vLLM split the
server for the same reason; so does ``slmserve serve`` by default.

:class:`ProcessEngine` is the front's stand-in for :class:`~slmserve.engine.AsyncEngine`: the
same ``start``/``submit``/``abort``/``score``/``shutdown`` and model facts, with the engine
running in a child process (:func:`main`) on the other end of a
Unix socket pair. Each direction sends one msgpack frame per event-loop turn: every submit and
abort the front's handlers made, or every output of one engine step. Prompts arrive as token
ids (the front tokenizes); the child detokenizes, as the engine always does.

What lives where: the tokenizer (pickled over once at start-up), routes and compressors in the
front; the model, KV pool, scheduler, ``slmserve_startup``/``slmserve_shutdown``/
``slmserve_request_finished`` hooks and the Prometheus metrics in the child (the front's
``/metrics`` asks the child for its text). Signals go to the front, which drains the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from slmserve.config import EngineConfig
from slmserve.engine import AsyncEngine, EngineClosedError, QueueFullError, RequestStream
from slmserve.engine.engine import check_items, prompt_token_ids
from slmserve.interfaces import ModelInfo
from slmserve.plugins import PluginManager
from slmserve.types import RequestOutput, SamplingParams, ScoreResult

log = logging.getLogger(__name__)

CHILD_MAIN = "import sys; from slmserve.server.engine_process import main; sys.exit(main())"
"""The child's command line (``-c``: the module must run under its import name, so the pickled
start-up frame names real classes)."""

START_TIMEOUT = 600.0
"""Seconds the child may take to load the model before ``start`` gives up."""

# ------------------------------------------------------------------------------ wire format


class Submit(msgspec.Struct, array_like=True):
    rid: str
    ids: list[int]
    params: SamplingParams
    client_id: str | None


class ScoreArgs(msgspec.Struct, kw_only=True):
    query: str | list[int]
    items: list[str | list[int]]
    label_token_ids: list[int]
    apply_softmax: bool
    item_first: bool
    template: str | None
    client_id: str | None


class Call(msgspec.Struct, kw_only=True):
    """A request that expects a :class:`Reply` with the same ``call`` number."""

    call: int
    kind: str
    """``score`` (with ``score``) or ``metrics`` (the Prometheus text)."""
    score: ScoreArgs | None = None


class ToEngine(msgspec.Struct, kw_only=True):
    """Everything the front queued during one event-loop turn."""

    submits: list[Submit] = []
    aborts: list[str] = []
    abort_all: bool = False
    calls: list[Call] = []
    cancels: list[int] = []
    """Calls whose caller went away (their work is aborted)."""
    shutdown: float | None = None
    """Drain within this many seconds, then stop (the last frame the front sends)."""


class Reply(msgspec.Struct, kw_only=True):
    call: int
    score: ScoreResult | None = None
    text: bytes | None = None
    error: str | None = None
    error_type: str | None = None


class FromEngine(msgspec.Struct, kw_only=True):
    """Everything the child produced during one event-loop turn (one step's outputs)."""

    outputs: list[RequestOutput] = []
    replies: list[Reply] = []
    closed: bool = False
    """The engine has stopped; nothing follows."""


class Start(msgspec.Struct, kw_only=True):
    config: EngineConfig
    model_name: str
    log_level: int
    cpus: list[int] | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """The child's first frame (pickled: the tokenizer is a Python object)."""

    info: ModelInfo
    tokenizer: Any
    max_model_len: int
    kv_slots: int


@dataclass(frozen=True, slots=True)
class RemoteBackend:
    """What the front knows of the child's backend: the facts and the tokenizer."""

    info: ModelInfo
    tokenizer: Any


_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (ValueError, RuntimeError, QueueFullError, EngineClosedError)
}


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "little")
    return await reader.readexactly(size)


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(4, "little") + payload)


class Outbox:
    """Coalesces messages into one frame per event-loop turn (``call_soon`` flushes).

    A message the wire cannot carry (msgpack has no integers beyond 64 bits) must not take the
    rest of the turn's messages with it, nor leave its sender waiting: the frame goes out
    without it, and ``unsendable(message, error)`` answers its sender."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        empty: Callable[[], Any],
        unsendable: Callable[[Any, Exception], None],
    ) -> None:
        self._writer = writer
        self._empty = empty
        self._unsendable = unsendable
        self._encoder = msgspec.msgpack.Encoder()
        self.pending = empty()
        self._scheduled = False

    def touch(self) -> Any:
        """The frame being filled; it goes out at the end of this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return self.pending

    def flush(self) -> None:
        self._scheduled = False
        frame, self.pending = self.pending, self._empty()
        if self._writer.is_closing():
            return
        try:
            payload = self._encoder.encode(frame)
        except (OverflowError, TypeError, ValueError):
            payload = self._encoder.encode(self._sendable(frame))
        write_frame(self._writer, payload)

    def _sendable(self, frame: Any) -> Any:
        """``frame`` without the list elements that do not encode, each one reported."""
        out = self._empty()
        for name in frame.__struct_fields__:
            value = getattr(frame, name)
            if isinstance(value, list):
                kept = []
                for message in value:
                    probe = self._empty()
                    setattr(probe, name, [message])
                    try:
                        self._encoder.encode(probe)
                    except (OverflowError, TypeError, ValueError) as exc:
                        log.error("a %s cannot be sent: %s", type(message).__name__, exc)
                        self._unsendable(message, exc)
                    else:
                        kept.append(message)
                value = kept
            setattr(out, name, value)
        return out


# ------------------------------------------------------------------------------ the front


class ProcessEngine:
    """What the server uses of ``AsyncEngine`` (start, submit, abort, score, shutdown, model
    facts), with the engine in a child process (see the module doc)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        plugins: PluginManager | None = None,
        model_name: str | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.cpus = cpus
        """CPUs the engine process is pinned to (``None``: not pinned)."""
        self.plugins = plugins or PluginManager()
        self.model_name = model_name or self.config.model or "demo"
        self.backend: RemoteBackend | None = None
        self._max_model_len = 0
        self._kv_slots = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: Outbox | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._request_ids = itertools.count()
        self._call_ids = itertools.count()
        self._accepting = False
        self._shutdown_task: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Spawn the child, send it the config, wait until its model is loaded."""
        if self._reader_task is not None:
            return
        front, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD_MAIN,
                str(child.fileno()),
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=front)
        start = Start(
            config=self.config,
            model_name=self.model_name,
            log_level=logging.getLogger().getEffectiveLevel(),
            cpus=sorted(self.cpus) if self.cpus else None,
        )
        write_frame(writer, msgspec.msgpack.encode(start))
        try:
            ready = pickle.loads(await asyncio.wait_for(read_frame(reader), START_TIMEOUT))
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            ready = f"the engine process exited (code {await self._reap(10.0)}); see its log"
            if isinstance(exc, TimeoutError):
                ready = f"the engine process did not load the model in {START_TIMEOUT:.0f} s"
        if not isinstance(ready, Ready):  # the child's error message, or ours
            writer.close()
            await self._reap(10.0)
            raise RuntimeError(ready)
        self.backend = RemoteBackend(ready.info, ready.tokenizer)
        self._max_model_len = ready.max_model_len
        self._kv_slots = ready.kv_slots
        self._writer = writer
        self._outbox = Outbox(writer, ToEngine, self._unsendable)
        self._accepting = True
        self._reader_task = asyncio.create_task(self._read(reader), name="slmserve-engine-reader")

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; the child finishes in-flight requests within ``timeout``, aborts the
        rest, sends their last outputs and exits. Concurrent calls share one shutdown."""
        if self._reader_task is None:
            return
        self._accepting = False
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, timeout: float) -> None:
        assert self._reader_task is not None and self._outbox is not None
        if not self._reader_task.done():
            self._outbox.touch().shutdown = timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader_task), timeout + 30.0)
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        if self._writer is not None:
            self._writer.close()
        await self._reap(30.0)
        self._fail_everything("the engine process stopped")

    async def _reap(self, timeout: float) -> int | None:
        """Wait for the child to exit (kill it after ``timeout``); its exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            return await proc.wait()

    async def __aenter__(self) -> ProcessEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def running(self) -> bool:
        task = self._reader_task
        return self._accepting and task is not None and not task.done()

    @property
    def pid(self) -> int | None:
        """The engine process's pid (``None`` before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def tokenizer(self) -> Any:
        if self.backend is None:
            raise EngineClosedError("the engine has not been started")
        return self.backend.tokenizer

    @property
    def max_model_len(self) -> int:
        if self.backend is None:
            raise EngineClosedError("the engine is not running")
        return self._max_model_len

    @property
    def kv_slots(self) -> int:
        return self._kv_slots

    # ---------------------------------------------------------------- requests

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
    ) -> RequestStream:
        """As :meth:`AsyncEngine.submit`. The queue bound is checked here, against requests
        in flight (``max_waiting_requests + max_running_requests``): the child's own queue is
        a frame away."""
        if not self.running or self.backend is None or self._outbox is None:
            raise EngineClosedError("the engine is not running")
        bound = self.config.max_waiting_requests + self.config.max_running_requests
        if len(self._streams) >= bound:
            raise QueueFullError(
                f"{len(self._streams)} requests are in flight, the limit is {bound} "
                f"(max_waiting_requests + max_running_requests); retry later"
            )
        vocab = self.backend.info.vocab_size
        ids = prompt_token_ids(prompt, self.backend.tokenizer, vocab, self._max_model_len)
        params = (params or SamplingParams()).check()  # what the child could not decode
        rid = request_id or f"req-{next(self._request_ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        stream = RequestStream(rid)
        self._streams[rid] = stream
        self._outbox.touch().submits.append(Submit(rid, ids, params, client_id))
        return stream

    def _unsendable(self, message: Any, error: Exception) -> None:
        """Answer the sender of a message the child could not be sent."""
        why = f"the request cannot be sent to the engine process: {error}"
        if isinstance(message, Submit):
            stream = self._streams.pop(message.rid, None)
            if stream is not None:
                stream.put(_failed(message.rid, why))
        elif isinstance(message, Call):
            future = self._calls.get(message.call)
            if future is not None and not future.done():
                future.set_exception(ValueError(why))

    def abort(self, request_id: str) -> None:
        if request_id in self._streams and self._outbox is not None:
            self._outbox.touch().aborts.append(request_id)

    def abort_all(self) -> None:
        if self._outbox is not None and self.running:
            self._outbox.touch().abort_all = True

    async def score(
        self,
        query: str | Sequence[int],
        items: Sequence[str | Sequence[int]],
        *,
        label_token_ids: Sequence[int],
        apply_softmax: bool = True,
        item_first: bool = False,
        template: str | None = None,
        client_id: str | None = None,
    ) -> ScoreResult:
        """As :meth:`AsyncEngine.score`, run by the child (errors keep their types)."""
        check_items(items)
        args = ScoreArgs(
            query=query if isinstance(query, str) else [int(t) for t in query],
            items=[x if isinstance(x, str) else [int(t) for t in x] for x in items],
            label_token_ids=[int(t) for t in label_token_ids],
            apply_softmax=apply_softmax,
            item_first=item_first,
            template=template,
            client_id=client_id,
        )
        reply = await self._call("score", score=args)
        assert reply.score is not None
        return reply.score

    async def metrics_text(self) -> bytes:
        """The child's Prometheus exposition (its registry holds every engine metric)."""
        reply = await self._call("metrics")
        return reply.text or b""

    async def _call(self, kind: str, score: ScoreArgs | None = None) -> Reply:
        # Metrics stay readable while draining; new work does not start.
        alive = self._reader_task is not None and not self._reader_task.done()
        if self._outbox is None or not (self.running or (kind == "metrics" and alive)):
            raise EngineClosedError("the engine is not running")
        call = next(self._call_ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        self._outbox.touch().calls.append(Call(call=call, kind=kind, score=score))
        try:
            reply = await future
        except asyncio.CancelledError:  # the caller went away: tell the child to stop too
            # (cancelling this task cancelled the future too; a reply would have resolved it)
            if self._outbox is not None and (future.cancelled() or not future.done()):
                self._outbox.touch().cancels.append(call)
            raise
        finally:
            self._calls.pop(call, None)
        if reply.error is not None:
            raise _ERRORS.get(reply.error_type or "", RuntimeError)(reply.error)
        return reply

    # ---------------------------------------------------------------- the reader

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Route the child's frames to streams and calls until it closes or dies."""
        decoder = msgspec.msgpack.Decoder(FromEngine)
        streams = self._streams
        try:
            while True:
                frame = decoder.decode(await read_frame(reader))
                for out in frame.outputs:
                    stream = streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                        if out.finish_reason is not None:
                            del streams[out.request_id]
                for reply in frame.replies:
                    future = self._calls.get(reply.call)
                    if future is not None and not future.done():
                        future.set_result(reply)
                if frame.closed:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the engine process exited unexpectedly; failing in-flight requests")
        finally:
            self._accepting = False
            self._fail_everything("the engine process stopped")

    def _fail_everything(self, error: str) -> None:
        for rid, stream in list(self._streams.items()):
            stream.put(_failed(rid, error))
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_result(Reply(call=-1, error=error, error_type="EngineClosedError"))


# ------------------------------------------------------------------------------ the child


class ForwardStream(RequestStream):
    """An output sink that sends each output to the front instead of queueing it here."""

    def __init__(self, request_id: str, outbox: Outbox) -> None:
        super().__init__(request_id)
        self._outbox = outbox

    def put(self, output: RequestOutput) -> None:
        if self.finished:
            return
        self.finished = output.finished
        self._outbox.touch().outputs.append(output)


async def serve_engine(sock: socket.socket) -> None:
    """The child's life: start the engine, then apply the front's frames until told to stop
    (or until the front goes away, which aborts everything)."""
    from slmserve.server.metrics import Metrics

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    start = msgspec.msgpack.decode(await read_frame(reader), type=Start)
    logging.getLogger().setLevel(start.log_level)
    if start.cpus:  # before the engine starts any thread: threads inherit the mask
        os.sched_setaffinity(0, start.cpus)
    # The front bounds requests in flight (it sees them first); a burst of submits arriving in
    # one frame must not trip the engine's own waiting-queue bound before it can schedule any.
    config = start.config
    config = config.replace(
        max_waiting_requests=config.max_waiting_requests + config.max_running_requests,
        model_thread=False,  # nothing else shares this loop (see EngineConfig.model_thread)
    )
    try:
        engine = AsyncEngine(config, plugins=PluginManager())
        await engine.start()
    except Exception as exc:  # a bad checkpoint, an unknown option: one line to the front
        write_frame(writer, pickle.dumps(f"{type(exc).__name__}: {exc}"))
        await writer.drain()
        writer.close()
        return
    metrics = Metrics(engine, start.model_name)
    metrics.attach()
    assert engine.backend is not None
    ready = Ready(engine.backend.info, engine.tokenizer, engine.max_model_len, engine.kv_slots)
    write_frame(writer, pickle.dumps(ready))

    def unsendable(message: Any, error: Exception) -> None:
        why = f"the result cannot be sent to the front process: {error}"
        if isinstance(message, RequestOutput):
            outbox.touch().outputs.append(_failed(message.request_id, why))
        elif isinstance(message, Reply):
            outbox.touch().replies.append(
                Reply(call=message.call, error=why, error_type="RuntimeError")
            )

    outbox = Outbox(writer, FromEngine, unsendable)
    decoder = msgspec.msgpack.Decoder(ToEngine)
    tasks: dict[int, asyncio.Task[None]] = {}
    timeout = 0.0
    try:
        while True:
            try:
                frame = decoder.decode(await read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("the front process went away; aborting in-flight requests")
                break
            for sub in frame.submits:
                _submit(engine, sub, outbox)
            for rid in frame.aborts:
                engine.abort(rid)
            if frame.abort_all:
                engine.abort_all()
            for call in frame.calls:
                task = asyncio.create_task(_answer(engine, metrics, call, outbox))
                tasks[call.call] = task
                task.add_done_callback(lambda _, n=call.call: tasks.pop(n, None))
            for number in frame.cancels:
                if number in tasks:
                    tasks[number].cancel()
            if frame.shutdown is not None:
                timeout = frame.shutdown
                break
        await engine.shutdown(timeout)
        if tasks:  # score calls whose requests the drain just finished: let them reply
            await asyncio.wait(list(tasks.values()), timeout=5.0)
        for task in list(tasks.values()):
            task.cancel()
        metrics.detach()
    finally:
        outbox.touch().closed = True
        outbox.flush()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def _submit(engine: AsyncEngine, sub: Submit, outbox: Outbox) -> None:
    stream = ForwardStream(sub.rid, outbox)
    try:
        engine.submit(sub.ids, sub.params, client_id=sub.client_id, stream=stream)
    except (ValueError, QueueFullError, EngineClosedError) as exc:
        stream.put(_failed(sub.rid, str(exc)))


def _failed(request_id: str, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id, new_token_ids=[], new_text="", finish_reason="error", error=error
    )


async def _answer(engine: AsyncEngine, metrics: Any, call: Call, outbox: Outbox) -> None:
    reply = Reply(call=call.call)
    try:
        if call.kind == "metrics":
            reply.text = metrics.render()
        elif call.kind == "score" and call.score is not None:
            a = call.score
            reply.score = await engine.score(
                a.query,
                a.items,
                label_token_ids=a.label_token_ids,
                apply_softmax=a.apply_softmax,
                item_first=a.item_first,
                template=a.template,
                client_id=a.client_id,
            )
        else:
            raise ValueError(f"unknown call {call.kind!r}")
    except Exception as exc:  # every failure goes back to the caller, typed
        reply.error, reply.error_type = str(exc), type(exc).__name__
    outbox.touch().replies.append(reply)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child (``CHILD_MAIN FD``, started by :class:`ProcessEngine`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -c CHILD_MAIN FD: started by the server, with a socket fd")
        return 2
    # Ctrl-C reaches the whole process group; the front decides how to stop (it drains us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format=f"%(levelname)s %(name)s[engine {os.getpid()}]: %(message)s")
    sock = socket.socket(fileno=int(args[0]))
    from slmserve.server.runner import loop_factory

    factory, _ = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve_engine(sock))
    return 0
