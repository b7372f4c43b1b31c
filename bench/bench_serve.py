"""Latency of `decoder serve` through its HTTP API: click → mask, both decoders, image switch.

    PYTHONPATH=. python bench/bench_serve.py [--clicks 20] [--switches 10] [--threads 0,1]

Builds a cache of the VOC sample in tests/data (tiny random encoder: the decoder is SAM's
full-size prompt encoder + mask decoder whatever the encoder, 4.06 M parameters) and a run
folder (a perturbed copy of the decoder, tests/decoder_runs.py), starts `decoder serve` in a
subprocess on 127.0.0.1 and times, over one kept-alive HTTP connection as a browser would:

- one click (multimask: 3 masks, upsampled to the original frame, PNG) for one decoder;
- the same with both decoders side by side (the page's default with a run);
- a box prompt (single mask) for one decoder;
- an image switch: ``/api/detail`` (ground-truth outlines, loads the embedding) + ``/api/image``
  (the JPEG), cycling over 5 images with an LRU of 4, so every switch reads the cache.

Targets (issue 12): click → mask median ≤ 50 ms for one decoder, ≤ 100 ms for both, image
switch ≤ 300 ms. Beside each median: the server's own time (decoder, PNG) and the CPU time the
server process used per request (user + system, all its threads), which does not grow with
other work on the machine: with one torch thread it is about the latency a quiet machine would
see. The server runs once per ``--threads`` value (`decoder serve --threads`: torch threads per
decoder call). The machine is shared: a 1024² fp32 matmul rate and the load average are printed
beside the figures so that runs can be compared.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.checkpoint_files import make_random_checkpoint  # noqa: E402
from stage1_embed.config import EmbedConfig  # noqa: E402
from stage1_embed.pipeline import run_embed  # noqa: E402
from tests.decoder_runs import make_run  # noqa: E402
from tests.serve_process import serving  # noqa: E402

VOC = REPO / "tests/data/voc2007_sample/VOCdevkit/VOC2007/JPEGImages"


def matmul_gflops() -> float:
    a = torch.randn(1024, 1024)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * 1024**3 / min(times) / 1e9


class Client:
    """One kept-alive HTTP/1.1 connection to the server."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[float, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        start = time.perf_counter()
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        elapsed = 1000 * (time.perf_counter() - start)
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:200]!r}")
        return elapsed, payload


def summary(name: str, times: list[float], target: float, server: list[float] | None = None) -> str:
    median = statistics.median(times)
    p90 = float(np.percentile(times, 90))
    extra = f"  (decoder+encode in server {statistics.median(server):6.1f} ms)" if server else ""
    verdict = "ok" if median <= target else "OVER"
    return (
        f"{name:34s} median {median:7.1f} ms  p90 {p90:7.1f} ms  target {target:4.0f} ms "
        f"{verdict}{extra}"
    )


def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    checkpoint = make_random_checkpoint("vit_tiny_random", work / "tiny.pth", seed=0)
    cache = work / "cache.zarr"
    run_embed(EmbedConfig(images=str(VOC), out=str(cache), model_type="vit_tiny_random",
                          checkpoint=str(checkpoint), precision="fp32", dtype="float16",
                          download=False))  # fmt: skip
    make_run(work / "run", cache, checkpoint)
    for threads in args.threads.split(","):
        serve_args = ["--cache", str(cache), "--run", str(work / "run"), "--labels",
                      str(work / "labels.json"), "--threads", threads]  # fmt: skip
        with serving(serve_args) as served:
            measure(Client(served.url), psutil.Process(served.pid), args, threads)


def measure(client: Client, server: psutil.Process, args: argparse.Namespace, threads: str) -> None:
    rng = np.random.default_rng(0)
    images = json.loads(client.call("GET", "/api/images")[1])["images"]
    ids = [im["image_id"] for im in images]
    first = images[0]
    client.call("GET", f"/api/detail?id={first['image_id']}")  # warm the embedding

    def click(decoders: list[str] | None, box: bool = False) -> tuple[float, float]:
        w, h = first["width"], first["height"]
        body: dict = {"image_id": first["image_id"]}
        if box:
            x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            body["box"] = [x0, y0, x0 + w / 3, y0 + h / 3]
        else:
            body |= {"points": [[rng.uniform(0, w), rng.uniform(0, h)]], "labels": [1]}
        if decoders:
            body["decoders"] = decoders
        elapsed, payload = client.call("POST", "/api/predict", body)
        return elapsed, json.loads(payload)["ms"]

    for _ in range(3):  # warm-up
        click(None)
    print(f"\n--threads {threads}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"fp32 1024² matmul {matmul_gflops():.0f} GFLOP/s (2 threads) now")  # fmt: skip
    rows = []
    for name, decoders, box in (("click -> mask, one decoder", ["fine_tuned"], False),
                                ("click -> mask, both side by side", None, False),
                                ("box -> mask, one decoder", ["fine_tuned"], True)):  # fmt: skip
        cpu = sum(server.cpu_times()[:2])
        measured = [click(decoders, box) for _ in range(args.clicks)]
        cpu_ms = 1000 * (sum(server.cpu_times()[:2]) - cpu) / args.clicks
        target = 100.0 if decoders is None else 50.0
        rows.append(summary(name, [m[0] for m in measured], target, [m[1] for m in measured]))
        rows[-1] += f"  server CPU {cpu_ms:6.1f} ms/click"
    switches = []
    for k in range(args.switches):
        image_id = ids[(k + 1) % len(ids)]
        a, _ = client.call("GET", f"/api/detail?id={image_id}")
        b, _ = client.call("GET", f"/api/image?id={image_id}")
        switches.append(a + b)
    rows.append(summary("image switch (detail + JPEG)", switches, 300.0))
    print("\n".join(rows))
    print(f"load average after: {os.getloadavg()[0]:.1f}; matmul {matmul_gflops():.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--threads", default="0,1", help="comma-separated thread counts")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
