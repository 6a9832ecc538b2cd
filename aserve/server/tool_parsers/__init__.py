"""Tool-call parsers for tool_choice "auto": the model writes its calls in its own format (its
chat template teaches it), and a parser finds them in the text, as vLLM's --tool-call-parser.

A parser works on a finished text (extract) and on a stream of text deltas (feed, then finish),
one instance per choice, built with the request's tools. PARSERS is the seam: add a class and
its --tool-call-parser name.
"""

from aserve.server.tool_parsers.base import (CallBlockParser, Delta, ParsedCalls, ToolCall, ToolParser,
                                             call_arguments, call_header, calls_from_deltas, new_call_id)
from aserve.server.tool_parsers.hermes import HermesToolParser
from aserve.server.tool_parsers.json_calls import (GraniteToolParser, Llama3JsonToolParser, MistralToolParser,
                                                   Phi4MiniJsonToolParser)
from aserve.server.tool_parsers.pythonic import Olmo3ToolParser, PythonicToolParser
from aserve.server.tool_parsers.qwen3_xml import Qwen3XmlToolParser, SeedOssToolParser

# --tool-call-parser NAME -> its parser class (vLLM's names).
PARSERS: dict[str, type[ToolParser]] = {
    "granite": GraniteToolParser,
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "olmo3": Olmo3ToolParser,
    "phi4_mini_json": Phi4MiniJsonToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3XmlToolParser,
    "qwen3_xml": Qwen3XmlToolParser,
    "seed_oss": SeedOssToolParser,
}

__all__ = ["PARSERS", "CallBlockParser", "Delta", "GraniteToolParser", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "Olmo3ToolParser", "ParsedCalls", "Phi4MiniJsonToolParser", "PythonicToolParser", "Qwen3XmlToolParser",
           "SeedOssToolParser", "ToolCall", "ToolParser", "call_arguments", "call_header", "calls_from_deltas",
           "new_call_id"]
