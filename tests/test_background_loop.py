"""The synchronous classes' background loop: a call interrupted by Ctrl-C stops its coroutine.

``Client``, ``EventPublisher`` and ``ResultSubscriber`` run their asyncio twins' coroutines on a
loop in a daemon thread. Ctrl-C reaches the caller's (main) thread, which was only waiting: the
coroutine must not go on publishing or submitting behind a caller who stopped.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from producer_sdk.client import BackgroundLoop


def interrupt_the_main_thread_once(condition) -> threading.Thread:
    """Send SIGINT (what Ctrl-C sends) to the main thread once ``condition()`` holds (bounded)."""
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        give_up = time.monotonic() + 30
        while not condition() and time.monotonic() < give_up:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_an_interrupted_call_cancels_its_coroutine_before_the_interruption_goes_on():
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    background = BackgroundLoop("test-background-loop")
    published: list[int] = []
    unwound = threading.Event()

    async def publish_forever() -> None:
        try:
            while True:
                published.append(len(published))
                await asyncio.sleep(0.001)
        finally:
            unwound.set()

    try:
        watcher = interrupt_the_main_thread_once(lambda: len(published) >= 5)
        with pytest.raises(KeyboardInterrupt):
            background.call(publish_forever())
        watcher.join()
        # Already unwound when the interruption reached the caller: nothing published after it.
        assert unwound.is_set()
        count = len(published)
        background.call(asyncio.sleep(0.05))  # the loop turns on; the cancelled coroutine does not
        assert len(published) == count
    finally:
        background.stop()


def test_a_call_that_finishes_or_fails_is_unchanged():
    background = BackgroundLoop("test-background-loop")

    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("no")

    try:
        assert background.call(answer()) == 42
        with pytest.raises(ValueError, match="no"):
            background.call(fail())
    finally:
        background.stop()
