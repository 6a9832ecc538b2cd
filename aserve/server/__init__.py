"""The HTTP server: vLLM's /generate and OpenAI's /v1 API on aiohttp + uvloop (see app.py)."""
