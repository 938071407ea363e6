"""The anti-entropy check on real shards: a difference seen twice is re-asserted, but not while
the node's own state keeps moving (a storm), for at most ``max_deferral``."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

from polling import settle
from support import StoreFactory

from gateway.metrics import Metrics
from gateway.store.healing import Healer, HealingSettings
from gateway.store.presence import LocalChannel, LocalState
from gateway.store.presence_redis import RedisPresenceStore


def _healer(
    store: RedisPresenceStore, state: Callable[[], LocalChannel], channel: str, **settings: float
) -> Healer:
    """A healer whose node holds ``state()`` in ``channel`` of app 1 (nothing else)."""

    def local_state(shard: int) -> LocalState:
        return {("1", channel): state()} if shard == store.shard_of("1", channel) else {}

    def local_channel(app_id: str, name: str) -> LocalChannel:
        return state() if (app_id, name) == ("1", channel) else LocalChannel(0, {}, False)

    return Healer(
        store,
        store.shards,
        local_state,
        local_channel,
        Metrics(),
        HealingSettings(confirm_delay=0.05, **settings),  # type: ignore[arg-type]
    )


async def test_a_stable_difference_is_reasserted(store_factory: StoreFactory) -> None:
    channel = f"heal-stable-{uuid.uuid4().hex[:8]}"
    store = await store_factory(f"heal@{uuid.uuid4().hex[:8]}")
    healer = _healer(store, lambda: LocalChannel(2, {}, False), channel)
    shard = store.shard_of("1", channel)
    assert await healer.check(shard) == "differ"
    await settle(lambda: _same(healer, shard), what="the re-asserted state to match")
    assert (await store.counts("1", channel)).subscription_count == 2


async def test_a_difference_while_the_state_moves_is_deferred_then_reasserted(
    store_factory: StoreFactory,
) -> None:
    channel = f"heal-moving-{uuid.uuid4().hex[:8]}"
    counter = itertools.count(1)

    def moving() -> LocalChannel:
        return LocalChannel(next(counter), {}, False)  # a new count at every look

    store = await store_factory(f"heal@{uuid.uuid4().hex[:8]}")
    shard = store.shard_of("1", channel)
    patient = _healer(store, moving, channel, max_deferral=60.0)
    assert await patient.check(shard) == "deferred"
    assert await patient.check(shard) == "deferred"
    assert (await store.counts("1", channel)).subscription_count == 0  # nothing re-written
    # Past max_deferral the difference is re-asserted even while the state moves.
    impatient = _healer(store, moving, channel, max_deferral=0.0)
    assert await impatient.check(shard) == "differ"
    await settle(lambda: _counted(store, channel), what="the re-assertion to write the channel")


async def _counted(store: RedisPresenceStore, channel: str) -> bool:
    return (await store.counts("1", channel)).subscription_count > 0


async def _same(healer: Healer, shard: int) -> bool:
    return await healer.check(shard) == "same"
