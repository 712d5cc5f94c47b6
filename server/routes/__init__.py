"""HTTP routes: OpenAI-compatible completions, the sessions API, and ops (health, ready, metrics)."""
