"""The OpenAI-compatible HTTP API, laid out per endpoint as vLLM's `vllm/entrypoints/openai/` is.

- `protocol`: the wire models: requests (with their limits) and pydantic responses (completions, chat
  completions, stream chunks, usage, model cards);
- `errors`: `ProtocolError`, its wire shape `ErrorResponse`, and the formatter of pydantic's errors;
- `parsing`: reading a body (bounded before parsing), ignored fields, `model` id checks;
- `choices`: a request's `choices` built from the replica's events (n, echo, logprobs);
- `chat_template`: a conversation rendered with the base model's chat template (run by the replica);
- `serving`: `OpenAIServing`, what the endpoints share (admission, answering, SSE, split metrics), and
  `serving_completion`, `serving_chat`, `serving_models` (`/v1/models` and name resolution) built on it.

`madapt.serve.ingress` routes HTTP requests to these. This package may import `madapt.config` (errors),
`madapt.store.releases`, `madapt.store`, `madapt.predict` (ids) and the serving modules that hold no model
(`args`, `auth`, `constrain`, `metrics`, `registry`, `request_merges`), plus FastAPI, pydantic and Ray
Serve's handles; none of the replica side's `replica`, `engine`, `scheduler`, `multilora`.
"""
