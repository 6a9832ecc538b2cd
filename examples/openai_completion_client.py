"""Example: aserve's /v1/completions through the official `openai` client (pip install openai).

Start a server first:   python -m aserve --model facebook/opt-125m
Then:                   python examples/openai_completion_client.py [--stream]
Set OPENAI_API_KEY if the server was started with --api-key.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--prompt", default="A robot may not injure a human being")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = client.models.list().data[0].id  # the server serves one model: ask which
    print(f"Model: {model}\nPrompt: {args.prompt!r}")
    result = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                       temperature=0, n=1, logprobs=1, stream=args.stream)
    if args.stream:
        for chunk in result:
            print(chunk.choices[0].text, end="", flush=True)
        print()
    else:
        choice = result.choices[0]
        print(f"Completion: {choice.text!r} (finish_reason={choice.finish_reason})")
        print(f"Usage: {result.usage}")


if __name__ == "__main__":
    main()
