"""Example: aserve's /v1/chat/completions through the official `openai` client (pip install openai).

Start a server first (the model needs a chat template, or pass --chat-template):
    python -m aserve --model Qwen/Qwen2.5-0.5B-Instruct
Then:
    python examples/openai_chat_client.py [--stream]
Set OPENAI_API_KEY if the server was started with --api-key.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"},
        {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
        {"role": "user", "content": "Where was it played?"},
    ]
    result = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            stream=args.stream)
    if args.stream:
        for chunk in result:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        print(result.choices[0].message.content)


if __name__ == "__main__":
    main()
