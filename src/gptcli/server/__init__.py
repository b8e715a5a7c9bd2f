"""An OpenAI-compatible HTTP server over the batched engine, and its chat page (no Typer, no Rich here)."""
