"""Embeddings, scores and reranking from a pooling server, with the official openai client.

Start the server with an embedding model (a decoder one: Qwen3-Embedding, gte-Qwen2, ...):
    python -m aserve --model Qwen/Qwen3-Embedding-0.6B --runner pooling
(the built-in random model serves too: `python -m aserve --runner pooling`).
"""

import argparse

import numpy as np
import requests
from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--base-url", default="http://localhost:8000")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url + "/v1", api_key="EMPTY")
model = client.models.list().data[0].id
texts = ["The capital of France is Paris.", "Paris is in France.", "Llamas live in the Andes."]
vectors = [np.array(d.embedding) for d in client.embeddings.create(model=model, input=texts).data]
print("dimensions:", len(vectors[0]))
print("cosine(0, 1) =", float(vectors[0] @ vectors[1]), " cosine(0, 2) =", float(vectors[0] @ vectors[2]))

ranked = requests.post(args.base_url + "/rerank", json={"model": model, "query": "Where is Paris?",
                                                        "documents": texts, "top_n": 2}, timeout=60).json()
for result in ranked["results"]:
    print(f"{result['relevance_score']:.3f}  {result['document']['text']}")
