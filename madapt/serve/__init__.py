"""Serving: the Ray Serve application (app), the mixed-adapter LoRA forward (batching), batched generation
(engine), the OpenAI wire format (protocol) and the registry actor owning hot adapter copies (registry)."""
