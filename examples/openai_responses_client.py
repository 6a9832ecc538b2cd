"""Example: aserve's /v1/responses (OpenAI's Responses API) through the official `openai` client.

Start a server first (the model needs a chat template, or pass --chat-template):
    python -m aserve --model Qwen/Qwen2.5-0.5B-Instruct
Then:
    python examples/openai_responses_client.py [--stream]
It asks a question, then a follow-up that continues the same conversation through
previous_response_id (the server keeps recent responses: store=true, OpenAI's default).
Set OPENAI_API_KEY if the server was started with --api-key.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def ask(client: OpenAI, model: str, text: str, previous_id, max_tokens: int, stream: bool):
    """Print the answer; return the response's id."""
    result = client.responses.create(model=model, input=text, instructions="You are a helpful assistant.",
                                     previous_response_id=previous_id, max_output_tokens=max_tokens, stream=stream)
    if not stream:
        print(result.output_text)
        return result.id
    response_id = None
    for event in result:
        if event.type == "response.output_text.delta":
            print(event.delta, end="", flush=True)
        elif event.type in ("response.completed", "response.incomplete"):
            response_id = event.response.id
    print()
    return response_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = client.models.list().data[0].id
    first = ask(client, model, "Who won the world series in 2020?", None, args.max_tokens, args.stream)
    ask(client, model, "Where was it played?", first, args.max_tokens, args.stream)


if __name__ == "__main__":
    main()
