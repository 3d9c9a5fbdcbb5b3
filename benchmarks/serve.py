"""`imat serve` under a bounded load: batching on vs off, with and without concurrent writes,
against in-process Engine.search on the same images, measured in the same run.

    python benchmarks/serve.py [--model model.onnx | --arch resnet18] [--clients 16] [--requests 50]

Gallery and queries: real ccp-dev photos (shared/data/ccp-dev/train) when present, else
synthetic ones (the output says which). Without --model an untrained --arch network is exported
to ONNX at --image-size (real compute, random weights: speed only, not quality).

Each scenario starts a real `imat serve` subprocess on 127.0.0.1 and runs --clients threads
(one HTTP connection each) doing --requests searches of one photo each; "writes" adds a
writer doing POST /v1/items and DELETE in turn until the searches end (at most --max-writes).
Printed: requests/s, p50/p95/p99 latency, the model calls the server made (searches and adds
share them), and the ratio of
requests/s to in-process Engine.search (one photo per call, sequential: what a caller without
the server gets) on the same photos.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"


def export_untrained(arch: str, image_size: int, out: pathlib.Path) -> pathlib.Path:
    from flax import nnx

    from imat.data_tools.labels import LabelSpace
    from imat.export.onnx_export import export_onnx
    from imat.train_jax.models import create_model

    model = create_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    return export_onnx(model, out, image_size=image_size, objective="bce", validate=False,
                       category_names=list(LabelSpace.default().category_names))


def photos(shared: pathlib.Path, gallery_n: int, query_n: int, tmp: pathlib.Path) -> tuple[list, list, str]:
    found = sorted((shared / "ccp-dev" / "train").glob("*.jpg"))
    if len(found) >= gallery_n + query_n:
        return found[:gallery_n], found[gallery_n:gallery_n + query_n], "ccp-dev photos"
    from imat.data_tools.synthetic import write_synthetic

    root = write_synthetic(tmp / "synth", gallery_n + query_n, seed=0, large_fraction=0.0)
    found = sorted((root / "train").glob("*.jpg"))
    return found[:gallery_n], found[gallery_n:], "synthetic photos (ccp-dev absent)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, index_dir, extra_args, log_path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "imat.cli.main", "-q", "serve", "--model", str(model), "--index", str(index_dir),
           "--port", str(port), *extra_args]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready in 120 s")


def model_calls(url) -> int:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("imat_model_calls_total "):
            return int(float(line.split()[1]))
    return 0


def load(url, query_bytes, clients: int, requests: int, k: int, writes: bool, write_bytes, max_writes: int,
         time_limit_s: float) -> dict:
    import httpx

    done = threading.Event()
    start_barrier = threading.Barrier(clients + (1 if writes else 0))
    deadline = time.monotonic() + time_limit_s

    def client(c: int) -> list[float]:
        lat = []
        with httpx.Client(base_url=url, timeout=60) as h:
            start_barrier.wait(timeout=60)
            for r in range(requests):
                if time.monotonic() > deadline:
                    break
                data = query_bytes[(c * requests + r) % len(query_bytes)]
                t0 = time.perf_counter()
                resp = h.post("/v1/search", files=[("image", ("q.jpg", data, "image/jpeg"))], data={"k": str(k)})
                lat.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    raise RuntimeError(f"search answered {resp.status_code}: {resp.text[:200]}")
        return lat

    def writer() -> int:
        n = 0
        with httpx.Client(base_url=url, timeout=60) as h:
            start_barrier.wait(timeout=60)
            while not done.is_set() and n < max_writes:
                item = f"bench-{n // 2}"
                if n % 2 == 0:
                    resp = h.post("/v1/items", files=[("image", ("w.jpg", write_bytes[n % len(write_bytes)],
                                                                 "image/jpeg"))], data={"id": item})
                else:
                    resp = h.delete(f"/v1/items/{item}")
                if resp.status_code not in (200, 201):
                    raise RuntimeError(f"write answered {resp.status_code}: {resp.text[:200]}")
                n += 1
        return n

    calls0 = model_calls(url)
    with concurrent.futures.ThreadPoolExecutor(clients + 1) as pool:
        wfut = pool.submit(writer) if writes else None
        t0 = time.perf_counter()
        futs = [pool.submit(client, c) for c in range(clients)]
        lats = [x for f in futs for x in f.result()]
        wall = time.perf_counter() - t0
        done.set()
        nwrites = wfut.result() if wfut else 0
    lat = np.asarray(lats) * 1000
    return {"requests": len(lats), "rps": len(lats) / wall, "p50": np.percentile(lat, 50),
            "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99), "writes_s": nwrites / wall,
            "model_calls": model_calls(url) - calls0, "writes": nwrites}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=None, help="model.onnx (default: export an untrained --arch)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    ap.add_argument("--gallery", type=int, default=300, help="photos in the index")
    ap.add_argument("--queries", type=int, default=100, help="distinct query photos")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="searches per client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="server decoder threads")
    ap.add_argument("--max-writes", type=int, default=400)
    ap.add_argument("--time-limit-s", type=float, default=300, help="per scenario")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of every scenario, in reversed order each round (a shared machine drifts)")
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("faiss").setLevel(logging.WARNING)
    from imat.engine import Engine

    with tempfile.TemporaryDirectory(prefix="imat-bench-serve-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        model = args.model or export_untrained(args.arch, args.image_size, tmp / "model.onnx")
        model_desc = str(args.model) if args.model else f"untrained {args.arch} at {args.image_size} px"
        gallery, queries, source = photos(args.shared, args.gallery, args.queries, tmp)
        engine = Engine(model, decode_threads=args.threads, batch_size=args.max_batch, progress=False)
        engine.build_index(gallery, tmp / "index", index_type="Flat")
        query_bytes = [p.read_bytes() for p in queries]
        write_bytes = [p.read_bytes() for p in gallery[:20]]

        # In-process: one photo per Engine.search call, sequential (bounded: at most 200 calls).
        g = engine.load_index(tmp / "index")
        engine.search(queries[:2], k=args.k, index=g)  # warm-up
        n_in = min(200, args.clients * args.requests)
        t0 = time.perf_counter()
        lat_in = []
        for i in range(n_in):
            t1 = time.perf_counter()
            engine.search([queries[i % len(queries)]], k=args.k, index=g)
            lat_in.append(time.perf_counter() - t1)
        in_rps = n_in / (time.perf_counter() - t0)
        lat_in_ms = np.asarray(lat_in) * 1000
        t0 = time.perf_counter()
        engine.search(queries, k=args.k, index=g)
        in_batched = len(queries) / (time.perf_counter() - t0)
        del engine, g

        scenarios = [("batching on", [], False), ("batching off", ["--no-batching"], False),
                     ("batching on + writes", [], True), ("batching off + writes", ["--no-batching"], True)]
        results: dict[str, list[dict]] = {name: [] for name, _, _ in scenarios}
        for round_no in range(args.rounds):
            for name, extra, writes in (scenarios if round_no % 2 == 0 else scenarios[::-1]):
                index_dir = tmp / f"index-{round_no}-{len(results[name])}-{extra}-{writes}"
                subprocess.run(["cp", "-r", str(tmp / "index"), str(index_dir)], check=True)
                proc, url = start_server(model, index_dir, ["--max-batch", str(args.max_batch), "--max-wait-ms",
                                                            str(args.max_wait_ms), "--threads", str(args.threads),
                                                            "--queue-limit", "1024", *extra], tmp / "server.log")
                try:
                    import httpx

                    httpx.post(url + "/v1/search", files=[("image", ("q.jpg", query_bytes[0], "image/jpeg"))])
                    r = load(url, query_bytes, args.clients, args.requests, args.k, writes, write_bytes,
                             args.max_writes, args.time_limit_s)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
                results[name].append(r)
                print(f"round {round_no + 1}: {name}: {r['rps']:.1f} req/s", file=sys.stderr)
        rows = []
        for name, _, _ in scenarios:
            runs = results[name]
            merged = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
            merged["per_round"] = " / ".join(f"{r['rps']:.1f}" for r in runs)
            rows.append((name, merged))

    print(f"\nmodel: {model_desc}; {len(gallery)}-photo Flat index of {source}; {len(queries)} distinct queries; "
          f"{args.clients} clients x {args.requests} searches (k={args.k}); --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g} --threads {args.threads}; {os.cpu_count()} CPUs\n")
    print(f"in-process Engine.search, one photo per call: {in_rps:.1f} req/s (p50 {np.percentile(lat_in_ms, 50):.1f} ms, "
          f"p99 {np.percentile(lat_in_ms, 99):.1f} ms); all {len(queries)} queries in one call: {in_batched:.1f} images/s\n")
    print(f"medians over {args.rounds} rounds (req/s of each round in the last column)\n")
    print("| scenario | searches | req/s | vs in-process | p50 ms | p95 ms | p99 ms | model calls (searches + adds) "
          "| writes/s | req/s by round |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in rows:
        print(f"| {name} | {r['requests']:.0f} | {r['rps']:.1f} | {r['rps'] / in_rps:.2f}x | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['p99']:.0f} | {r['model_calls']:.0f} | {r['writes_s']:.1f} | {r['per_round']} |")


if __name__ == "__main__":
    main()
