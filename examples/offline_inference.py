"""The quickstart: batch generation with OfflineLLM (the built-in model when --model is omitted)."""

import argparse

from aserve import OfflineLLM, SamplingParams

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", default=None, help="a Hugging Face folder or hub id (default: built-in)")
args = parser.parse_args()

prompts = ["Hello, my name is", "The president of the United States is",
           "The capital of France is", "The future of AI is"]
llm = OfflineLLM(model=args.model)
outputs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95))
for o in outputs:
    print(o.prompt, o.outputs[0].text)
