"""Submit one inference over HTTP and wait for its outcome (httpx; no platform code needed).

    MLP_API_KEY=<key> python examples/http_client.py --user alice --prompt "test prompt"

POST to the gateway (202 + request_id), then long-poll the read API until a terminal state.
Prints the final status document as JSON; exits 0 when completed, 1 when failed or rejected,
2 on timeout, 3 when the submit was refused (4xx/5xx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import httpx

TERMINAL = ("completed", "failed", "rejected", "cancelled", "expired")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default=os.environ.get("MLP_GATEWAY_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api", default=os.environ.get("MLP_API_URL", "http://127.0.0.1:8081"))
    parser.add_argument("--user", required=True)
    parser.add_argument("--model", default="basic-model")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    headers = {"Idempotency-Key": str(uuid.uuid4())}  # a retried POST returns the same request_id
    if key := os.environ.get("MLP_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    body = {"prompt": args.prompt, "user_id": args.user, "model": args.model, "max_tokens": args.max_tokens}
    submitted = httpx.post(f"{args.gateway}/api/v1/inference", json=body, headers=headers, timeout=10)
    if submitted.status_code != 202:
        print(f"submit refused: {submitted.status_code} {submitted.text}", file=sys.stderr)
        return 3
    request_id = submitted.json()["request_id"]
    print(f"submitted request {request_id}", file=sys.stderr)

    deadline = time.monotonic() + args.timeout
    while (left := deadline - time.monotonic()) > 0:
        wait = min(left, 30.0)
        status = httpx.get(f"{args.api}/api/v1/inference/{request_id}", params={"wait": wait}, timeout=wait + 10)
        status.raise_for_status()
        document = status.json()
        if document["status"] in TERMINAL:
            print(json.dumps(document))
            return 0 if document["status"] == "completed" else 1
    print(f"no outcome for {request_id} within {args.timeout}s", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
