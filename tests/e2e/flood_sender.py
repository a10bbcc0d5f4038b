"""The flood of tests/e2e/test_flood.py, sent from a process of its own over one AMQP
connection (one channel, as fast as it goes: no publisher confirms).

Usage: ``python flood_sender.py URL EXCHANGE MESSAGES_FILE``. ``MESSAGES_FILE`` holds
``(routing key, body)`` records, each as a 2-byte key length, the key, a 4-byte body length
and the body (big endian). The sender connects, prints ``ready``, waits for ``go`` on stdin,
publishes every record in order and prints one JSON line: the monotonic clock (shared by
the processes of one machine) when it started and when the broker had taken the last
message, and how many it sent. Any other line (or none) ends it without sending.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from pathlib import Path


def read_records(path: Path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        (klen,) = struct.unpack_from(">H", data, i)
        key = data[i + 2 : i + 2 + klen].decode()
        i += 2 + klen
        (blen,) = struct.unpack_from(">I", data, i)
        out.append((key, data[i + 4 : i + 4 + blen]))
        i += 4 + blen
    return out


def write_records(path: Path, records: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as fh:
        for key, body in records:
            raw = key.encode()
            fh.write(struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(body)) + body)


async def main(url: str, exchange_name: str, path: Path) -> None:
    import aio_pika

    records = read_records(path)
    connection = await aio_pika.connect(url)
    # no publisher confirms: an attacker does not wait for them; closing the channel (its
    # close-ok follows every publish before it) tells that the broker took them all
    channel = await connection.channel(publisher_confirms=False)
    exchange = await channel.get_exchange(exchange_name, ensure=False)
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":  # the test ended before the flood was due
        await connection.close()
        return
    start = time.monotonic()
    for key, body in records:
        await exchange.publish(aio_pika.Message(body), routing_key=key)
    await channel.close()
    end = time.monotonic()
    print(json.dumps({"start": start, "end": end, "sent": len(records)}), flush=True)
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
