"""``python -m tests.gradcam_callers BASE TOKEN IMAGE N``: N clients calling ``POST /gradcam`` with
IMAGE in a loop, as the web page does (after a 503 a client waits its ``Retry-After``), until its
standard input closes; prints ``started`` once every client runs, then the JSON count of answers by
status.

A process of its own, as the clients of a service are other machines: in the test's process, 40
client threads would share the interpreter lock with the client whose latency the test measures.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
from pathlib import Path

import httpx


def main(base: str, token: str, image: str, n: int) -> int:
    path = Path(image)
    upload = (path.name, path.read_bytes(), "image/jpeg")
    headers = {"Authorization": f"Bearer {token}"}
    stop, statuses, lock = threading.Event(), collections.Counter(), threading.Lock()

    def caller() -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/gradcam", files={"image": upload}, headers=headers)
                with lock:
                    statuses[r.status_code] += 1
                if r.status_code == 503:
                    stop.wait(float(r.headers["retry-after"]))

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({str(k): v for k, v in sorted(statuses.items())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
