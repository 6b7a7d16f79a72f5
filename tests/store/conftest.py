"""The file store as the relay opens it (`relay`) and as the `queue` CLI opens it beside the
running relay (`cli`), shared by the file store's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.store.files import FileStore


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[FileStore]:
    store = FileStore(tmp_path / "spool", reserve_bytes=0)
    await store.recover()
    yield store
    await store.close()


@pytest.fixture
async def cli(relay: FileStore) -> AsyncIterator[FileStore]:
    """The `queue` CLI's view of the relay's spool, opened while the relay runs."""
    store = FileStore(relay.root, reserve_bytes=0, threads=2)
    await store.open_for_operator()
    yield store
    await store.close()
