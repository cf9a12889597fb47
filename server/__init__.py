"""Kiln's OpenAI-compatible HTTP server (`serve-llm`) and its load client (`bench-llm serve`).

app.py routes and auth, serving_*.py the OpenAI endpoints, async_engine.py the bridge to the
engine thread, protocol.py request bodies, metrics.py Prometheus, config.py / cli.py the edge.
"""
