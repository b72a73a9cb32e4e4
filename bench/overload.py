"""Overload benchmark: what admission by time does at 2x, 4x and 8x the sustainable rate.

Starts a real `osdface serve` (default batching, queue and deadline settings unless given),
measures the sustainable rate (closed loop, `--clients` at a time, aligned faces), then sends
open-loop arrivals at multiples of it for `--duration` seconds each and waits for every answer.
Per level: the share of 200 / 429 / 504 (and anything else), and p50 / p99 latency of the 200s,
which admission by time should keep under the deadline.

    python -m bench.overload --tiny                        # tiny random weights, CPU
    python -m bench.overload --weights ./osdface-weights --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.inputs import weights_folder
from bench.load import (
    add_server_arguments,
    bench_client,
    input_image,
    start_server,
    stop_server,
)
from osdface.client import AsyncClient, ClientError, RestoreOptions, ServiceError

logger = logging.getLogger("bench.overload")

SERVER_ENV = {"OSDFACE_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}


@dataclass
class Level:
    multiple: float
    rate: float  # requests per second sent
    sent: int
    statuses: Counter
    p50: float
    p99: float
    slowest: float

    def share(self, status: int) -> float:
        return self.statuses.get(status, 0) / self.sent if self.sent else 0.0


async def _post(client: AsyncClient, image: bytes, options: RestoreOptions) -> tuple[int, float]:
    """(the status, 0 when no answer came; seconds) of one restore, never retried."""
    started = time.perf_counter()
    try:
        await client.restore(image, options, filename="in.jpg")
        status = 200
    except ServiceError as exc:
        status = exc.status
    except ClientError as exc:
        logger.warning("request failed: %s", exc)
        status = 0
    return status, time.perf_counter() - started


def _client(base: str, connections: int) -> AsyncClient:
    return bench_client(base, connections, deadline_s=900.0)


async def sustainable_rate(
    base: str, image: bytes, options: RestoreOptions, clients: int, total: int
) -> float:
    """Requests per second a closed loop of `clients` gets answered 200 (after a warm-up)."""
    async with _client(base, clients) as client:
        await asyncio.gather(*(_post(client, image, options) for _ in range(clients)))
        left, statuses = total, Counter()

        async def loop() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                status, _ = await _post(client, image, options)
                statuses[status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        logger.info("closed loop of %d clients: %s", clients, dict(statuses))
        if not statuses[200]:
            raise RuntimeError(f"no request succeeded in the closed loop: {dict(statuses)}")
        return statuses[200] / (time.perf_counter() - started)


async def open_loop(
    base: str, image: bytes, options: RestoreOptions, rate: float, duration: float
) -> list:
    """Send at a constant `rate` for `duration` seconds, whatever comes back; all answers."""
    count = max(1, round(rate * duration))
    async with _client(base, count) as client:
        tasks = []
        started = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(_post(client, image, options)))
        return await asyncio.gather(*tasks)


def summarise(multiple: float, rate: float, answers: list[tuple[int, float]]) -> Level:
    ok = np.asarray([s for status, s in answers if status == 200] or [float("nan")])
    return Level(
        multiple,
        rate,
        len(answers),
        Counter(status for status, _ in answers),
        float(np.percentile(ok, 50)),
        float(np.percentile(ok, 99)),
        float(np.max(ok)),
    )


def table(levels: list[Level], sustainable: float, timeout: str) -> str:
    lines = [
        f"sustainable rate {sustainable:.3f} req/s; deadline {timeout} s",
        "",
        "| load | req/s sent | requests | 200 | 429 | 504 | other | p50 of 200 s | p99 of 200 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        other = lv.sent - sum(lv.statuses.get(s, 0) for s in (200, 429, 504))
        lines.append(
            f"| {lv.multiple:g}x | {lv.rate:.2f} | {lv.sent} | {lv.share(200):.0%} | "
            f"{lv.share(429):.0%} | {lv.share(504):.0%} | {other} | {lv.p50:.2f} | {lv.p99:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--multiples", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per level")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients for the rate")
    p.add_argument("--rate-requests", type=int, default=24, help="requests to measure the rate")
    p.add_argument("--env", nargs="*", default=[], help="extra NAME=VALUE server settings")
    p.add_argument("--log-dir", type=Path, help="keep the server's log here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    env = SERVER_ENV | dict(item.split("=", 1) for item in args.env)
    timeout = env.get("OSDFACE_REQUEST_TIMEOUT_S", "60 (default)")

    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_folder(args.weights, args.tiny, Path(tmp) / "w")
        image, options = input_image(args)
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        # bench.load's launcher applies its own settings first; ours (the defaults) win.
        process, base = start_server(args, weights, _defaults_over_load_env(env), log_dir / "s.log")
        try:
            rate = asyncio.run(
                sustainable_rate(base, image, options, args.clients, args.rate_requests)
            )
            logger.info("sustainable rate: %.3f req/s", rate)
            levels = []
            for multiple in args.multiples:
                answers = asyncio.run(
                    open_loop(base, image, options, rate * multiple, args.duration)
                )
                levels.append(summarise(multiple, rate * multiple, answers))
                logger.info("%s", levels[-1])
        finally:
            stop_server(process)
    print(table(levels, rate, timeout))
    return 0


def _defaults_over_load_env(env: dict[str, str]) -> dict[str, str]:
    """bench.load's COMMON_ENV raises the queue, in-flight and deadline settings; put the
    service defaults back (from `Settings`) unless `--env` names them."""
    from service.settings import Settings, env_name

    defaults = Settings.model_fields
    names = ("max_queue_faces", "max_inflight_requests", "request_timeout_s")
    restored = {env_name(n): str(defaults[n].default) for n in names}
    return restored | env


if __name__ == "__main__":
    raise SystemExit(main())
