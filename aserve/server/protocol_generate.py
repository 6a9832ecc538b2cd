"""Request and response bodies of the simple /generate API (aserve/server/api_generate.py):
a prompt, a stream flag and SamplingParams' own fields, validated as strictly as the OpenAI
routes' bodies in protocol.py."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from aserve.sampling_params import SamplingParams
from aserve.server.errors import SAMPLING_FIELDS, APIError, bad_request_from_value_error
from aserve.server.protocol import output_kind_for


class GenerateRequest(BaseModel):
    """The simple API: a prompt, a stream flag, and any SamplingParams field by its own name,
    each typed as strictly as the OpenAI routes' fields (a string for a bool is a 400)."""

    model_config = ConfigDict(strict=True, extra="allow")  # unknown names: a 400 naming them
    prompt: Union[str, list[int]]
    stream: bool = False
    # SamplingParams' fields; only those the body sets are passed on, so its defaults apply.
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, Literal["never"]] = False
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    prompt_logprobs_temperature: Optional[float] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: Optional[dict[str, float]] = None
    structured_outputs: Optional[Any] = None   # StructuredOutputsParams' fields, as a JSON object
    guided_decoding: Optional[Any] = None      # its older name
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    truncate_prompt_tokens: Optional[int] = None

    def to_sampling_params(self) -> SamplingParams:
        unknown = sorted(self.model_extra or {})
        if unknown:
            raise APIError(400, f"Unknown field(s) {', '.join(unknown)}: /generate takes prompt, "
                                "stream and SamplingParams fields.", param=unknown[0])
        fields = {name: getattr(self, name) for name in self.model_fields_set & SAMPLING_FIELDS}
        if fields.get("use_beam_search") and "temperature" not in fields:
            fields["temperature"] = 0.0
        fields["output_kind"] = output_kind_for(self.stream)
        try:
            return SamplingParams(**fields)
        except ValueError as exc:
            raise bad_request_from_value_error(exc) from None


class GenerateResponse(BaseModel):
    text: list[str]
