"""
Load test of the Gradio app: `python app.py` on a model, driven from many concurrent `gradio_client` clients for a
bounded time, on loopback only.

    python bench/app_load.py --model outputs/demo/model --clients 50 --seconds 60

Each client asks `/generate` for random seeds, one request after another. Every request ends in one of three ways: an
engraving and its caption; a "busy" answer (Gradio's queue is full: the client is told at once to try again); or an
error (anything else: a 5xx, a crash, a lost connection), which is what must not happen. Prints, and writes with
--output_json, the counts, throughput, median and p95 latency of the answered requests, and the server's resident
memory at the start, its peak, and at the end.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
BUSY_WORDS = ("queue is full", "try again")


def parse_args():
    parser = argparse.ArgumentParser(description="Concurrent clients against app.py's /generate endpoint.")
    parser.add_argument("--model", default="outputs/demo/model", help="MODEL_ID for app.py: a folder or a Hub id.")
    parser.add_argument("--clients", type=int, default=50, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=60.0, help="How long the clients keep asking.")
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    return parser.parse_args()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resident_megabytes(pid):
    """The process's resident memory (VmRSS) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_app(model, port):
    """`python app.py` on 127.0.0.1:`port`; returns the process once the app answers."""
    from gradio_client import Client

    environment = {
        **os.environ,
        "MODEL_ID": model,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "app.py")], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"app.py exited: {server.stderr.read().decode()[-2000:]}")
        try:
            Client(f"http://127.0.0.1:{port}/", verbose=False)
            return server
        except Exception:
            time.sleep(1)
    server.kill()
    sys.exit("app.py did not answer within 180 s.")


def client_loop(url, stop_at, results, lock):
    """One client: asks for random seeds until `stop_at`, appending `(outcome, seconds, detail)` to `results`."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            image, caption = client.predict(random.randint(0, 2**32 - 1), api_name="/generate")
            # A caption may be empty (a briefly trained model can end it at once); a missing image is an error.
            outcome, detail = (
                ("ok", "") if Path(image).is_file() and isinstance(caption, str) else ("error", "no image")
            )
        except Exception as error:  # each failure is classified, none may pass unnoticed
            text = str(error)
            outcome = "busy" if any(word in text.lower() for word in BUSY_WORDS) else "error"
            detail = f"{type(error).__name__}: {text[:200]}"
        with lock:
            results.append((outcome, time.monotonic() - started, detail))


def main():
    args = parse_args()
    port = free_port()
    server = start_app(args.model, port)
    memory = [resident_megabytes(server.pid)]
    results, lock = [], threading.Lock()
    started = time.monotonic()
    stop_at = started + args.seconds
    clients = [
        threading.Thread(target=client_loop, args=(f"http://127.0.0.1:{port}/", stop_at, results, lock), daemon=True)
        for _ in range(args.clients)
    ]
    for client in clients:
        client.start()
    while any(client.is_alive() for client in clients):
        memory.append(resident_megabytes(server.pid))
        time.sleep(1)
    elapsed = time.monotonic() - started
    memory.append(resident_megabytes(server.pid))
    server.terminate()
    server.wait(timeout=30)

    answered = sorted(seconds for outcome, seconds, _ in results if outcome == "ok")
    errors = [detail for outcome, _, detail in results if outcome == "error"]
    report = {
        "model": args.model,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "cpu_count": os.cpu_count(),
        "answered": len(answered),
        "busy": sum(outcome == "busy" for outcome, _, _ in results),
        "errors": len(errors),
        "error_examples": errors[:5],
        "answered_per_second": round(len(answered) / elapsed, 2),
        "median_seconds": round(statistics.median(answered), 3) if answered else None,
        "p95_seconds": round(answered[int(0.95 * (len(answered) - 1))], 3) if answered else None,
        "server_memory_mb": {"start": round(memory[0]), "peak": round(max(memory)), "end": round(memory[-1])},
        # One sample every ten seconds, to see whether memory levels off.
        "server_memory_mb_every_10_s": [round(value) for value in memory[::10]],
    }
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
