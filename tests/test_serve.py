"""serve.Row, the text of one answer as it streams: stop strings across token boundaries, half
UTF-8 characters never sent, and the sent deltas adding up to the answer."""

import pytest

from picochat.serve import Row


def stream(tokenizer, text, stops):
    """Feed the tokens of text one by one (each token a separate step, so multi-byte characters
    and stop strings span steps); (deltas, row)."""
    row = Row(tokenizer, stops)
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(row.add(token, set()))
        if row.finish:
            break
    if row.finish is None:
        deltas.append(row.flush())
    return deltas, row


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello world, and more", ["lo wo"], "Hel"),
    ("Hello world, and more", ["zzz", "d, a"], "Hello worl"),
    ("Café 🙂 naïve 中文 end", ["🙂 n"], "Café "),
    ("Café 🙂 naïve 中文 end", ["文 e"], "Café 🙂 naïve 中"),
    ("Café 🙂 naïve 中文 end", [], "Café 🙂 naïve 中文 end"),
    ("no stop here", ["here!"], "no stop here"),
])
def test_stops_and_utf8(small_tokenizer, text, stops, expected):
    deltas, row = stream(small_tokenizer, text, stops)
    assert "".join(deltas) == row.text == expected
    assert not any("\ufffd" in d for d in deltas)
    assert row.finish == ("stop" if expected != text else None)
    # multi-byte characters arrive over several byte-level tokens here, so some steps send nothing
    if "🙂" in text:
        assert "" in deltas


def test_the_pool_serves_first_come_first_served():
    """A released worker goes to the longest waiter, not to a request that arrives as it is
    released; a waiter that leaves is skipped; past max_queue waiters, a 503."""
    import asyncio

    from picochat.serve import ApiError, Worker, WorkerPool

    async def main():
        pool = WorkerPool([Worker(0, None, "cpu")], max_queue=2)
        first = await pool.acquire()
        order = []

        async def wait(name):
            worker = await pool.acquire()
            order.append(name)
            return worker

        a = asyncio.create_task(wait("a"))
        gone = asyncio.create_task(wait("gone"))
        await asyncio.sleep(0)
        assert pool.waiting == 2
        with pytest.raises(ApiError) as e:
            await pool.acquire()
        assert e.value.status == 503
        gone.cancel()
        await asyncio.sleep(0)
        assert pool.waiting == 1
        pool.release(first)
        # a newcomer arriving just as the worker comes back, before the waiter has woken: it waits
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.acquire(), 0.05)
        assert order == ["a"] and pool.busy == {0}
        late = asyncio.create_task(wait("late"))
        await asyncio.sleep(0)
        pool.release(await a)
        pool.release(await late)
        assert order == ["a", "late"] and pool.served == 3 and len(pool.free) == 1 and not pool.busy

    asyncio.run(main())
