"""Structured outputs: a request's output forced to match a JSON schema, regex, choice or
grammar by masking the logits each step (params.py: what a request asks; backend.py:
llguidance, which compiles grammars and tracks each sequence; bitmask.py: the masks)."""

from aserve.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["GuidedDecodingParams", "StructuredOutputsParams"]
