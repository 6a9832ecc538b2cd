"""Tool-call parsers for tool_choice "auto": the model writes its calls in its own format (its
chat template teaches it), and a parser finds them in the text, as vLLM's --tool-call-parser.

A parser works on a finished text (extract) and on a stream of text deltas (feed, then finish),
one instance per choice, built with the request's tools. PARSERS is the seam: add a class and
its --tool-call-parser name.
"""

from aserve.server.tool_parsers.base import (CallBlockParser, Delta, ParsedCalls, ToolCall, ToolParser,
                                             call_arguments, call_header, calls_from_deltas, new_call_id)
from aserve.server.tool_parsers.hermes import HermesToolParser
from aserve.server.tool_parsers.json_calls import Llama3JsonToolParser, MistralToolParser
from aserve.server.tool_parsers.pythonic import PythonicToolParser
from aserve.server.tool_parsers.qwen3_xml import Qwen3XmlToolParser

# --tool-call-parser NAME -> its parser class (vLLM's names).
PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3XmlToolParser,
    "qwen3_xml": Qwen3XmlToolParser,
}

__all__ = ["PARSERS", "CallBlockParser", "Delta", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "ParsedCalls", "PythonicToolParser", "Qwen3XmlToolParser", "ToolCall",
           "ToolParser", "call_arguments", "call_header", "calls_from_deltas", "new_call_id"]
