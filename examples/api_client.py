"""Example client of aserve's simple /generate API (as vLLM's examples/api_client.py).

Start a server first:   python -m aserve --model facebook/opt-125m
Then:                   python examples/api_client.py --n 4 --prompt "San Francisco is a" [--stream]

With --n above 1 it asks for beam search (n beams, temperature 0); with --n 1, greedy decoding.
Only the standard library is used, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--n", type=int, default=4, help="how many outputs (beams when above 1)")
    parser.add_argument("--prompt", default="San Francisco is a")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="print the texts as they grow")
    args = parser.parse_args()

    body = {"prompt": args.prompt, "n": args.n, "temperature": 0, "max_tokens": args.max_tokens,
            "use_beam_search": args.n > 1, "stream": args.stream}
    url = f"http://{args.host}:{args.port}/generate"
    print(f"Prompt: {args.prompt!r}\n", flush=True)
    label = "Beam candidate" if args.n > 1 else "Output"
    try:
        with post(url, body) as response:
            if not args.stream:
                for i, text in enumerate(json.loads(response.read())["text"]):
                    print(f"{label} {i}: {text!r}")
                return
            # One JSON object per line, each holding every output's full text so far.
            for line in response:
                if not line.strip():
                    continue
                texts = json.loads(line)["text"]
                print("\n".join(f"{label} {i}: {t!r}" for i, t in enumerate(texts)), end="\n\n", flush=True)
    except urllib.error.HTTPError as exc:
        sys.exit(f"HTTP {exc.code}: {exc.read().decode()}")


if __name__ == "__main__":
    main()
