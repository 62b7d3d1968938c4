"""Built-in end-to-end pipelines (`igds-fast distill` with no models runs `digits`)."""
