"""pipeline.serve under load, on loopback: a few clients ask for short answers in a loop while a
multi-megabyte prompt is sent now and then. The huge prompt must get its 400 within a fraction of a
second (it is refused by its length, before tokenizing and before the generation queue), and the
other clients must neither fail nor slow down much while it is refused. Bounded: 8 to 25 s of
traffic after the server starts, 10 s on a quiet machine."""

import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlsplit

from tests.test_serve import NAME, serve

CLIENTS = 3  # fewer than the default --max_queue of 8: every request is served, none gets a 503
WARMUP = 1.0  # seconds of requests left out of the baseline
SAMPLES, PHASE = (
    12,
    12.0,
)  # each phase lasts until it has this many normal requests, or for at most this many seconds
HUGE_PROMPTS, HUGE_EVERY = 6, 0.5  # at least this many, one every half second
HUGE_CHARS = 4_000_000  # ~4 MB of JSON, under the default --max_request_bytes of 8 MiB


def post(address: tuple[str, int], body: bytes, timeout: float) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(
            "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_huge_prompt_gets_its_400_at_once_and_other_clients_keep_their_pace(tiny_model, tmp_path):
    with serve(
        tiny_model, tmp_path, "--template_name", "qwen"
    ) as url:  # the default limits, context 1024
        parts = urlsplit(url)
        address = (parts.hostname, parts.port)
        normal = json.dumps(
            {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        ).encode()
        huge = json.dumps(
            {"model": NAME, "messages": [{"role": "user", "content": "word " * (HUGE_CHARS // 5)}]}
        ).encode()
        done = threading.Event()
        served: list[
            tuple[float, float, int]
        ] = []  # (start, seconds, status) of each normal request
        errors: list[str] = []

        def client() -> None:
            while not done.is_set():
                start = time.monotonic()
                try:
                    status, _ = post(address, normal, 20)
                except (
                    OSError,
                    http.client.HTTPException,
                ) as e:  # refused, reset, timed out: failures too
                    status = 0
                    errors.append(repr(e))
                served.append((start, time.monotonic() - start, status))

        def answered_since(moment: float) -> int:
            return sum(start + seconds >= moment for start, seconds, _ in served)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(WARMUP)
        began = time.monotonic()
        while answered_since(began) < SAMPLES + CLIENTS and time.monotonic() < began + PHASE:
            time.sleep(0.05)
        refused: list[
            tuple[float, int, str]
        ] = []  # (seconds to the answer, status, message) of each huge prompt
        abuse_start = time.monotonic()
        while len(refused) < HUGE_PROMPTS or (
            answered_since(abuse_start) < SAMPLES and time.monotonic() < abuse_start + PHASE
        ):
            start = time.monotonic()
            status, body = post(address, huge, 5)
            refused.append((time.monotonic() - start, status, body["error"]["message"]))
            time.sleep(max(0.0, start + HUGE_EVERY - time.monotonic()))
        abuse_end = time.monotonic()
        done.set()
        for thread in threads:
            thread.join(timeout=max(0.0, abuse_end + 20 - time.monotonic()))

    baseline = [s for start, s, _ in served if began <= start and start + s < abuse_start]
    during = [s for start, s, _ in served if start < abuse_end and start + s > abuse_start]
    base_median, abuse_median = statistics.median(baseline), statistics.median(during)
    print(
        f"\n{len(served)} normal requests by {CLIENTS} clients; baseline median "
        f"{base_median * 1000:.0f} ms (p90 {statistics.quantiles(baseline, n=10)[-1] * 1000:.0f}, "
        f"n={len(baseline)}), during the huge prompts median {abuse_median * 1000:.0f} ms (max "
        f"{max(during) * 1000:.0f}, n={len(during)}); huge prompts refused in "
        f"{', '.join(f'{s * 1000:.0f}' for s, _, _ in refused)} ms"
    )
    failed = [r for r in served if r[2] != 200]
    assert not failed, f"{len(failed)} normal requests failed: {errors or failed}"
    assert len(baseline) >= 5 and len(during) >= 5, "too few requests to compare"
    for seconds, status, message in refused:
        assert status == 400 and "characters, too long for the 1023 tokens it may have" in message
        assert seconds < 0.5, f"the huge prompt took {seconds:.2f} s to be refused"
    # a loaded 2-core machine is noisy: the median during the abuse within 3x the baseline's, plus
    # 0.25 s
    assert abuse_median <= 3 * base_median + 0.25, (
        f"normal requests slowed from {base_median:.3f} s to {abuse_median:.3f} s"
    )
