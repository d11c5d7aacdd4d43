"""The chunk ledger on its own: one place says whether a chunk is held for a
commit, pinned in the cache, stored, being deleted or being shared, and the
pins follow those states exactly (a leaked pin is a chunk never evicted; a
missing one, the only copy of committed data evicted)."""

from __future__ import annotations

import os

import trio

from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.chunks.ledger import ChunkLedger


def _ledger(tmp_path) -> tuple[ChunkLedger, str]:
    cache = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    cache.open()
    data = os.urandom(1000)
    chunk = chunk_id(data)
    cache.put(chunk, data)
    return ChunkLedger(cache), chunk


def test_holds_pin_until_stored_or_released(tmp_path):
    ledger, chunk = _ledger(tmp_path)
    ledger.hold(chunk)
    ledger.hold(chunk)  # two writers sealed the same bytes
    assert ledger.is_sealed(chunk) and ledger.cache.is_pinned(chunk) and ledger.in_use(chunk)
    released = ledger.released(chunk)
    ledger.stored(chunk)  # the store has it: no pin needed, still held
    assert not ledger.cache.is_pinned(chunk) and ledger.is_sealed(chunk)
    ledger.release(chunk)
    assert not released.is_set()
    ledger.release(chunk)
    assert released.is_set() and not ledger.is_sealed(chunk) and not ledger.in_use(chunk)
    assert ledger.released(chunk).is_set()  # nothing holds it: set at once
    assert ledger.holds == {}


def test_pending_upload_pins_until_stored(tmp_path):
    ledger, chunk = _ledger(tmp_path)
    ledger.hold(chunk)
    ledger.pending(chunk)  # committed: pinned by the pending upload
    ledger.release(chunk)
    assert ledger.cache.is_pinned(chunk) and ledger.in_use(chunk)
    ledger.stored(chunk, pending=True)
    assert not ledger.cache.is_pinned(chunk) and not ledger.in_use(chunk)


async def test_a_seal_waits_for_a_deletion_of_the_same_bytes(tmp_path):
    ledger, chunk = _ledger(tmp_path)
    order = []

    async def sealer():
        await ledger.wait_not_deleting(chunk)
        order.append("sealed")

    async with trio.open_nursery() as nursery:
        with ledger.deleting(chunk):
            assert ledger.in_use(chunk)
            nursery.start_soon(sealer)
            await trio.sleep(0.01)
            order.append("deleted")
    assert order == ["deleted", "sealed"]


def test_a_chunk_is_shared_once_at_a_time(tmp_path):
    ledger, chunk = _ledger(tmp_path)
    assert ledger.share_started(chunk)
    assert not ledger.share_started(chunk)
    assert ledger.sharing == {chunk}
    ledger.share_ended(chunk)
    assert ledger.sharing == set()
