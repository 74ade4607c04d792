"""Serving: the Ray Serve application (`app`) of an OpenAI-compatible API over one base model with many
adapters.

The HTTP side: `ingress` routes to the endpoints in `openai` (wire models, parsing, errors, completions,
chat, models), which resolve names (`madapt.store.releases`) and hand requests to the replicas. The model side:
`replica` (`AdapterServer`), `scheduler` and `engine` (continuous batching), `sampling`, `constrain`
(grammars), `multilora` (the per-row LoRA layer), `tuners` (adapters it cannot gather), `saved_modules`
(modules_to_save and trainable tokens), `request_merges`, `registry` (hot adapter copies), `adapter_tiers`
(which adapters a replica keeps, by bytes, on the device and in host memory) with its pure-Python policy
`adapter_cache`, `loading`, `health`, `metrics`; `args` and `auth` serve both sides. `madapt.lora`'s import
of a PEFT adapter checks its saved modules with `saved_modules`, as serving builds them.

May import: `madapt.config`, `madapt.store`, `madapt.store.releases`, `madapt.models`, `madapt.lora`,
`madapt.lowrank`, `madapt.predict`, `madapt.data` (chat rendering), `madapt.json_grammar`, `madapt.errors`,
`madapt.merge` (`merge_adapters`: a per-request merge is built by the function that publishes one);
nothing from training or the CLI. Inside, the HTTP side (`ingress`, `openai`) imports
of the model side only `constrain` (the `response_format` check), `registry`'s error statuses and
`request_merges`' reading of a merge request.
"""
