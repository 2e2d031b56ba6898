"""Ask a node a question with the official openai SDK: only base_url changes.

    python examples/client.py [--base-url http://127.0.0.1:4000/v1] [--model smollm2] [--wait 180]

With --wait, first polls the node's /health/ready (the model may still be loading).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI


def wait_ready(base_url: str, timeout: float) -> None:
    root = base_url.removesuffix("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{root}/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    sys.exit(f"node at {root} not ready after {timeout:g} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:4000/v1")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="Write one sentence about the sea.")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the node to be ready")
    args = parser.parse_args()
    if args.wait:
        wait_ready(args.base_url, args.wait)

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("WWWSERVE_API_KEY", "none"))
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(
                f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]"
            )


if __name__ == "__main__":
    main()
