"""How a long-running process stops, stalls and fails: signals, a watchdog, bounded retries, exit codes.

Every long-running process (worker, archive sink, publisher, replica, serving) ends within seconds of SIGTERM or
SIGINT, whatever it is doing. A signal sets ``stop`` so the main loop finishes its cycle, checkpoints and exits 0.
A Kafka client can however block or spin inside a call (kafka-python 3.0 loops for good in ``poll()`` after a
record batch it cannot decompress), so the signal also arms a timer that ends the process after ``grace_s``
regardless. Nothing is lost by that: what is on disk is the last checkpoint, written atomically, which is what
a SIGKILL leaves and what every process recovers from.

A process that cannot make progress exits non-zero rather than spinning, so that its supervisor (systemd,
Kubernetes, compose) restarts it and the restart count shows the trouble:

- a Kafka error that retrying cannot mend (a codec the client lacks, a corrupt batch) ends it at once;
- retriable errors are retried for ``retry_s``, then it ends;
- a main loop that has not come round for ``stall_s`` (stuck inside a client call) is ended by the watchdog;
- the cluster refusing the credentials or certificate ends it with :data:`EXIT_AUTH`, without retrying.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from kafka.errors import AuthorizationError, KafkaError, SaslAuthenticationFailedError

from streaming.settings import SettingsError

__all__ = [
    "EXIT_AUTH",
    "EXIT_STALLED",
    "KafkaAuthFailed",
    "KafkaStalled",
    "ProcessGuard",
    "RetryBudget",
    "exit_code",
    "run_main",
    "setup_logging",
]

logger = logging.getLogger(__name__)

# sysexits.h: EX_UNAVAILABLE (the service it needs cannot be used) and EX_NOPERM (refused access).
EXIT_STALLED = 69
EXIT_AUTH = 77


class KafkaStalled(RuntimeError):
    """Kafka could not be read (or written) for longer than the retry budget, or not at all."""


class KafkaAuthFailed(RuntimeError):
    """The cluster refused this client's credentials or certificate; retrying would only repeat the refusal."""


def _auth_failure(exc: BaseException) -> bool:
    if isinstance(exc, SaslAuthenticationFailedError | AuthorizationError | ssl.SSLError):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _auth_failure(cause)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error that ends a process, or ``None`` if it is not one of these."""
    if isinstance(exc, KafkaAuthFailed) or (isinstance(exc, KafkaError) and _auth_failure(exc)):
        return EXIT_AUTH
    if isinstance(exc, KafkaStalled):
        return EXIT_STALLED
    return None


class RetryBudget:
    """Consecutive failures of one Kafka call, bounded in time. ``failed`` raises once the budget is spent.

    ``what`` names the call in the messages (e.g. "poll of the event topics")."""

    def __init__(self, what: str, retry_s: float, *, on_failure: Callable[[BaseException], None] | None = None):
        self.what = what
        self.retry_s = retry_s
        self._on_failure = on_failure
        self._since: float | None = None
        self._logged = 0.0

    def ok(self) -> None:
        if self._since is not None:
            logger.info("%s works again after %.1f s", self.what, time.monotonic() - self._since)
        self._since = None

    def failed(self, exc: BaseException) -> None:
        """Record a failure; raise :class:`KafkaAuthFailed` or :class:`KafkaStalled` when retrying cannot help."""
        if self._on_failure is not None:
            self._on_failure(exc)
        if _auth_failure(exc):
            raise KafkaAuthFailed(f"{self.what}: the cluster refused this client: {type(exc).__name__}: {exc}") from exc
        if isinstance(exc, KafkaError) and not exc.retriable:
            raise KafkaStalled(
                f"{self.what} failed with an error retrying cannot mend: {type(exc).__name__}: {exc}"
            ) from exc
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since > self.retry_s:
            raise KafkaStalled(
                f"{self.what} has failed for {now - self._since:.0f} s (limit {self.retry_s:g} s); "
                f"last error {type(exc).__name__}: {exc}"
            ) from exc
        if now - self._logged >= 10:  # one line every 10 s, not a storm
            self._logged = now
            logger.warning("%s failed (%s: %s); retrying", self.what, type(exc).__name__, exc)


def _main_thread_at() -> str:
    """Where the main thread is now, innermost frame of this project's code first, then the innermost frame."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    frames = []
    while frame is not None:
        frames.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    if not frames:
        return "?"
    return " <- ".join(frames[:3])


class ProcessGuard:
    """Signal handlers, a forced exit ``grace_s`` after a stop signal, and a stall watchdog.

    The main loop calls :meth:`beat` every cycle; with ``stall_s`` > 0 a loop that has not come round for that
    long is ended with :data:`EXIT_STALLED` (after a log line saying where it was). ``stop`` is the event the
    main loop watches."""

    def __init__(self, name: str, *, grace_s: float = 8.0, stall_s: float = 0.0) -> None:
        self.name = name
        self.grace_s = grace_s
        self.stall_s = stall_s
        self.stop = threading.Event()
        self._beat = time.monotonic()
        self._signalled: int | None = None
        self._done = threading.Event()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def install(self) -> ProcessGuard:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # `kill -USR1 <pid>`: every thread's stack on stderr, to see where a process that seems stuck is.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        if self.stall_s > 0:
            threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True).start()
        return self

    def done(self) -> None:
        """The process has finished its clean exit: the watchdog and the forced exit stand down."""
        self._done.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._signalled is not None:  # a second signal: the operator insists
            self._exit(128 + signum, f"second {signal.Signals(signum).name}: exiting now")
        self._signalled = signum
        logger.info("%s received %s: stopping (at most %g s)", self.name, signal.Signals(signum).name, self.grace_s)
        self.stop.set()
        threading.Thread(target=self._force, args=(signum,), name=f"{self.name}-stop", daemon=True).start()

    def _force(self, signum: int) -> None:
        if not self._done.wait(self.grace_s):
            self._exit(
                128 + signum,
                f"{self.name} did not stop within {self.grace_s:g} s of {signal.Signals(signum).name}, stuck at "
                f"{_main_thread_at()}; exiting with its last checkpoint",
            )

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            quiet = time.monotonic() - self._beat
            if quiet > self.stall_s and self._signalled is None:
                self._exit(
                    EXIT_STALLED,
                    f"{self.name} made no progress for {quiet:.0f} s (limit {self.stall_s:g} s), stuck at "
                    f"{_main_thread_at()}; exiting with its last checkpoint so that a supervisor restarts it",
                )

    def _exit(self, code: int, message: str) -> None:
        logger.error(message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(code)


def run_main(name: str, main: Callable[[], int | None]) -> int:
    """Run a process's main function. A Kafka stall or refusal ends it with one clear error line and its exit code
    (:data:`EXIT_STALLED`, :data:`EXIT_AUTH`) instead of a traceback, and so do bad settings (exit 2, as for bad
    flags); anything else propagates."""
    try:
        return int(main() or 0)
    except SettingsError as exc:
        logger.error("%s: bad settings: %s", name, exc)
        return 2
    except (KafkaStalled, KafkaAuthFailed, KafkaError) as exc:
        code = exit_code(exc)
        if code is None:
            raise
        logger.error("%s exits (%d): %s", name, code, exc)
        return code


def setup_logging(level: str | int = logging.INFO) -> None:
    """One log format for every process. The Kafka client's own connection errors are silenced: they repeat at
    every reconnect, and this project reports them once, with their cause (:class:`RetryBudget`,
    :func:`streaming.access.diagnose`)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature it tries
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("kafka.net").setLevel(logging.CRITICAL)
    logging.getLogger("kafka.conn").setLevel(logging.CRITICAL)
    logging.getLogger("kafka.cluster").addFilter(_drop_cancelled)


def _drop_cancelled(record: logging.LogRecord) -> bool:
    """The client logs a metadata request it cancels itself, when it closes, as an error ("Metadata refresh: failed
    Cancelled"): not a fault, and a process that exits for a real one should say only that one."""
    return not any(type(arg).__name__ == "Cancelled" for arg in (record.args or ()))
