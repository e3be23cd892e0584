"""`DecoderPool`: client images are decoded in child processes, never in the serving process.

Making an image canonical (`guardrail.service.canonical`) runs native code (libpng, libjpeg,
libwebp through Pillow; OpenCV's PNG encoder) on bytes a client chose.  A crash there must not
take down the process that serves the proxy and the API, so `guardrail serve` does it in a few
child processes, one image at a time each:

- a child that dies mid-decode (a segfault, the OOM killer, `kill -9`) fails only the image it
  was decoding (422, `the image crashed the decoder (killed by SIGSEGV)`); it is replaced;
- a decode that runs past `timeout_seconds` is killed the same way (422);
- no free child within the caller's wait: 503 with `Retry-After` (`DecodeBusyError`), as when
  the pixel budget is spent.

Children come from multiprocessing's `forkserver` with this module preloaded: a fresh server
process (no threads, locks or sockets of the parent) forks each child in milliseconds, with
NumPy, Pillow and OpenCV already imported.  They start on first use and stop with `close`, at
garbage collection, or when the parent dies (their pipe closes).  The decoded pixels of the
pixel budget are held here, in the parent, at the size the header gives, for as long as a child
decodes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from guardrail.service import images
from guardrail.service.canonical import (
    AuditResolution,
    CanonicalImage,
    ImageLimits,
    PixelBudget,
    canonical_canvas,
    canonical_image,
)
from guardrail.service.images import DecodeBusyError, ImageRejectedError

if TYPE_CHECKING:
    from detectors.layout import ImageLayout

__all__ = ["DecoderFailedError", "DecoderPool", "decode_pixels"]

log = logging.getLogger("guardrail.decoders")


class DecoderFailedError(ImageRejectedError):
    """The image crashed or hung the process decoding it (422)."""


@dataclass(frozen=True, slots=True)
class _Job:
    data: bytes
    limits: ImageLimits
    resolution: AuditResolution
    n_regions: int


@dataclass(frozen=True, slots=True)
class _Canvas:
    images: tuple[CanonicalImage, ...]
    min_side: int
    n_regions: int
    max_pixels: int | None


def _decode(job: _Job | _Canvas) -> tuple[Any, ...]:
    """What a child sends back: ("ok", the `CanonicalImage`) (with its layout for a canvas)
    or ("rejected", the error's class name, its message)."""
    if isinstance(job, _Canvas):
        try:
            canvas, layout = canonical_canvas(
                job.images,
                min_side=job.min_side,
                n_regions=job.n_regions,
                max_pixels=job.max_pixels,
            )
        except ImageRejectedError as exc:
            return ("rejected", type(exc).__name__, str(exc))
        return ("ok", canvas, layout)
    try:
        image = canonical_image(
            job.data,
            limits=job.limits,
            resolution=job.resolution,
            n_regions=job.n_regions,
            budget=None,  # the parent holds the budget while this child decodes
            wait_seconds=0.0,
        )
    except ImageRejectedError as exc:
        return ("rejected", type(exc).__name__, str(exc))
    return ("ok", image)


def _child_main(conn: Connection) -> None:
    """A decoder child: one image at a time until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _decode(job)
        except Exception as exc:  # a bug, not the image: say so, stay alive
            reply = ("error", type(exc).__name__, str(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _rebuild(name: str, message: str) -> ImageRejectedError:
    cls = getattr(images, name, None)
    if isinstance(cls, type) and issubclass(cls, ImageRejectedError) and cls is not DecodeBusyError:
        return cls(message)
    return ImageRejectedError(message)


def decode_pixels(data: bytes) -> int:
    """The most pixels decoding `data` may hold, from its header: its size, twice that for a
    progressive JPEG (libjpeg keeps every coefficient at full size, 2 bytes a sample).

    Raises:
        ImageRejectedError: not PNG/JPEG/WebP, or no valid header.
    """
    fmt = images.sniff_format(data)
    width, height = images.image_header(data, fmt)
    # 0xFFC2 (a progressive frame header) never occurs inside entropy-coded data
    progressive = fmt == "JPEG" and b"\xff\xc2" in data
    return width * height * (2 if progressive else 1)


def _how_it_died(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Child:
    def __init__(self, context: Any) -> None:
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_end,), name="guardrail-decoder", daemon=True
        )
        self.process.start()
        child_end.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


def _stop_all(children: list[_Child]) -> None:
    for child in list(children):
        child.stop()
    children.clear()


class DecoderPool:
    """`processes` child processes that make images canonical, one image at a time each.

    Args:
        processes: children decoding at once (started on first use).
        timeout_seconds: the longest one image may take; past it the child is killed and the
            image refused (422).
        on_crash: called each time an image crashes or hangs its child (a metric).
    """

    def __init__(
        self,
        processes: int,
        *,
        timeout_seconds: float = 30.0,
        on_crash: Callable[[], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = processes
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Child | None] = queue.LifoQueue()
        self._children: list[_Child] = []  # every live child, idle or busy
        self._started = False
        self._closed = False
        self.crashes = 0  # children lost to an image (died or timed out)
        self._busy = 0  # jobs taken by a child and not yet answered
        self._on_crash = on_crash
        self._finalizer = weakref.finalize(self, _stop_all, self._children)

    def _context(self) -> Any:
        if "forkserver" not in multiprocessing.get_all_start_methods():  # not POSIX
            return multiprocessing.get_context("spawn")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder pool is closed")
            if self._started:
                return
            self._started = True
            for _ in range(self.processes):
                self._idle.put(None)  # a slot: its child starts when first taken

    def start(self) -> None:
        """Start every child now instead of on first use (`guardrail serve` does, so that the
        first images do not wait for a new interpreter to import the decoders)."""
        self._start()
        slots = []
        while True:
            try:
                slots.append(self._idle.get_nowait())
            except queue.Empty:
                break
        try:
            for i, slot in enumerate(slots):
                if slot is None:
                    slots[i] = self._spawn()
        finally:
            for slot in slots:
                self._idle.put(slot)

    def _spawn(self) -> _Child:
        child = _Child(self._context())
        with self._lock:
            self._children.append(child)
        return child

    def _retire(self, child: _Child) -> None:
        child.stop()
        with self._lock, contextlib.suppress(ValueError):
            self._children.remove(child)

    def canonical(
        self,
        data: bytes,
        *,
        limits: ImageLimits,
        resolution: AuditResolution,
        n_regions: int,
        budget: PixelBudget,
        wait_seconds: float,
    ) -> CanonicalImage:
        """`canonical_image(data, ...)`, computed in a child while the pixels its decode may
        hold (`decode_pixels`, from the header) are held from `budget`.

        Raises:
            ImageRejectedError: what `canonical_image` raises (413/415/422), or
                `DecoderFailedError` (422) when the image crashed or hung its child.
            DecodeBusyError (503): no budget or no free child within `wait_seconds`.
        """
        reply = self._run(
            _Job(data, limits, resolution, n_regions), decode_pixels(data), budget, wait_seconds
        )
        image: CanonicalImage = reply[0]
        return image

    def canvas(
        self,
        images: Sequence[CanonicalImage],
        *,
        min_side: int,
        n_regions: int,
        budget: PixelBudget,
        wait_seconds: float,
        max_pixels: int | None = None,
    ) -> tuple[CanonicalImage, ImageLayout]:
        """`canonical_canvas(images, ...)`: several canonical images laid side by side on one
        canonical canvas, in a child (the pixels of the images and the canvas held from
        `budget`).

        Raises:
            ImageRejectedError: an image too small beside the others (422), or
                `DecoderFailedError` (422) when it crashed or hung its child.
            DecodeBusyError (503): no budget or no free child within `wait_seconds`.
        """
        pixels = 2 * sum(i.width * i.height for i in images)
        job = _Canvas(tuple(images), min_side, n_regions, max_pixels)
        reply = self._run(job, pixels, budget, wait_seconds)
        return reply[0], reply[1]

    def _run(
        self, job: _Job | _Canvas, pixels: int, budget: PixelBudget, wait_seconds: float
    ) -> list[Any]:
        """A job run by a free child while `pixels` are held from `budget`: its results."""
        self._start()
        with budget.hold(pixels, timeout=wait_seconds):
            try:
                slot = self._idle.get(timeout=wait_seconds)
            except queue.Empty:
                raise DecodeBusyError(
                    f"all {self.processes} image decoders are busy; retry in a second",
                    retry_after=1,
                ) from None
            child = slot
            with self._lock:
                self._busy += 1
            try:
                if child is None or not child.process.is_alive():
                    if child is not None:
                        self._retire(child)
                    child = self._spawn()
                reply = self._ask(child, job)
            except BaseException:
                if child is not None:
                    self._retire(child)
                self._idle_again(None)  # the slot is free again; a new child starts on use
                raise
            self._idle_again(child)
        kind, *fields = reply
        if kind == "ok":
            return fields
        if kind == "rejected":
            raise _rebuild(*fields)
        raise RuntimeError(f"the image decoder failed: {fields[0]}: {fields[1]}")

    def _idle_again(self, slot: _Child | None) -> None:
        with self._lock:
            self._busy -= 1
        self._idle.put(slot)

    def _ask(self, child: _Child, job: _Job | _Canvas) -> tuple[Any, ...]:
        try:
            child.conn.send(job)
            if child.conn.poll(self.timeout_seconds):
                reply: tuple[Any, ...] = child.conn.recv()
                return reply
        except (EOFError, OSError):
            pass  # it died: below
        child.process.join(timeout=1.0)
        alive = child.process.is_alive()
        self.crashes += 1
        if self._on_crash is not None:
            self._on_crash()
        if alive:
            log.warning("an image decoder ran past %g s; it is replaced", self.timeout_seconds)
            raise DecoderFailedError(
                f"the image took more than {self.timeout_seconds:g} s to decode and was refused "
                "(ingest_decode_timeout_seconds)"
            )
        how = _how_it_died(child.process)
        log.warning("an image decoder was lost (%s); it is replaced", how)
        raise DecoderFailedError(f"the image crashed the decoder ({how})")

    def close(self) -> None:
        """Stop every child (idempotent); later calls to `canonical` raise."""
        with self._lock:
            self._closed = True
        self._finalizer()

    @property
    def busy(self) -> int:
        """Jobs a child has taken and not yet answered."""
        with self._lock:
            return self._busy

    @property
    def pids(self) -> list[int]:
        """The live children's process ids (for benchmarks and tests)."""
        with self._lock:
            return [c.process.pid for c in self._children if c.process.pid is not None]
