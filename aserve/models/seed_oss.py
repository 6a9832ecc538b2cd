"""Seed-OSS (SeedOssForCausalLM: ByteDance's Seed-OSS-36B): Llama's layers with separate
switches for the q/k/v biases (attention_bias) and the output projection's (attention_out_bias)."""

from __future__ import annotations

from aserve.models.llama import LlamaForCausalLM


class SeedOssForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        return bool(getattr(config, "attention_bias", True)), bool(getattr(config, "attention_out_bias", False))
