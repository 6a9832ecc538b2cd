"""Example: structured outputs and tool calling through the official `openai` client.

Start a server first; any model works for response_format and a named or "required"
tool_choice (the grammar forces the shape). tool_choice "auto" needs a model that writes
Hermes-style calls, and the flags:
    python -m aserve --model Qwen/Qwen2.5-0.5B-Instruct --enable-auto-tool-choice --tool-call-parser hermes
Then:
    python examples/openai_tools_client.py [--tool-choice auto|required|named] [--stream]
"""

from __future__ import annotations

import argparse
import json
import os

from openai import OpenAI

CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer", "minimum": 0}},
        "required": ["name", "population"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--tool-choice", default="named", choices=["auto", "required", "named"])
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = client.models.list().data[0].id

    chat = client.chat.completions.create(
        model=model, max_tokens=200, messages=[{"role": "user", "content": "The largest city in Japan?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    print("response_format:", chat.choices[0].message.content, chat.choices[0].finish_reason)

    tool_choice = ({"type": "function", "function": {"name": "get_weather"}} if args.tool_choice == "named"
                   else args.tool_choice)
    result = client.chat.completions.create(
        model=model, max_tokens=200, messages=[{"role": "user", "content": "Is it raining in Paris?"}],
        tools=TOOLS, tool_choice=tool_choice, stream=args.stream)
    if not args.stream:
        message = result.choices[0].message
        for call in message.tool_calls or []:
            print("tool call:", call.id, call.function.name, json.loads(call.function.arguments))
        print("content:", message.content, "finish_reason:", result.choices[0].finish_reason)
        return
    calls: dict[int, list[str]] = {}   # index -> [name, arguments so far]
    for chunk in result:
        for fragment in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(fragment.index, [fragment.function.name, ""])
            call[1] += fragment.function.arguments or ""
        if chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    for name, arguments in calls.values():
        print("tool call:", name, json.loads(arguments))


if __name__ == "__main__":
    main()
