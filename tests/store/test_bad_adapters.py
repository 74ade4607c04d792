"""A corpus of bad adapter directories: each import exits 2 naming the problem, and nothing is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, MissConfig, OFTConfig, PeftConfig, RandLoraConfig, ShiraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from madapt.cli import main
from madapt.models import build_tiny_llama, load_base
from madapt.store import AdapterStore


def save_peft_dir(base_dir: str, target: Path, r: int = 4, config: PeftConfig | None = None) -> Path:
    torch.manual_seed(0)
    config = config or LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_base(base_dir).model, config).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def good_dir(tiny_model, tmp_path_factory) -> Path:
    return save_peft_dir(tiny_model, tmp_path_factory.mktemp("peft") / "good")


@pytest.fixture
def cli_config(tiny_model, tmp_path) -> str:
    path = tmp_path / "c.yaml"
    doc = {"base_model": tiny_model, "adapter": {"r": 4}, "storage": {"uri": str(tmp_path / "store")}}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def variant(good_dir: Path, tmp_path: Path, change) -> Path:
    target = tmp_path / "bad"
    target.mkdir()
    for f in good_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    change(target)
    return target


def edit_config(**updates):
    def change(d: Path):
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(updates)
        (d / "adapter_config.json").write_text(json.dumps(config))

    return change


def edit_tensors(fn):
    def change(d: Path):
        tensors = load_file(d / "adapter_model.safetensors")
        save_file(fn(tensors), d / "adapter_model.safetensors")

    return change


def pickle_only(d: Path):
    tensors = load_file(d / "adapter_model.safetensors")
    torch.save(tensors, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()


def nan_weights(tensors):
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    return tensors


def with_extra(suffix: str, shape: tuple[int, ...]):
    """Adds one tensor named after the first LoRA module plus `suffix`: what serving would drop."""

    def change(tensors):
        module = next(k for k in sorted(tensors) if k.endswith("lora_A.weight")).removesuffix(".lora_A.weight")
        return {**tensors, f"{module}{suffix}": torch.zeros(shape)}

    return change


def saved_head(shape: tuple[int, ...]):
    """Declares a saved lm_head (modules_to_save) and stores one of `shape`."""

    def change(d: Path):
        edit_config(modules_to_save=["lm_head"])(d)
        edit_tensors(lambda tensors: {**tensors, "base_model.model.lm_head.weight": torch.zeros(shape)})(d)

    return change


def lower_rank(tensors):
    return {k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in tensors.items()}


CASES = [
    ("pickle only", pickle_only, "no adapter_model.safetensors; found ['adapter_model.bin'], which madapt never loads"),
    ("no config", lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    ("config not json", lambda d: (d / "adapter_config.json").write_text("{r: 4"), "not valid JSON"),
    (
        "garbage weights",
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
        "not a readable safetensors",
    ),
    ("nan weights", edit_tensors(nan_weights), "has NaN or infinite values"),
    ("wrong targets", edit_config(target_modules=["q_proj", "wq"]), "base model has no module(s) ['wq']"),
    ("rank mismatch", edit_tensors(lower_rank), "adapter_config.json says r=4 but"),
    ("unknown type", edit_config(peft_type="PROMPT_TUNING"), "ext: adapter type 'PROMPT_TUNING' is not supported"),
    ("tensors of another type", edit_config(peft_type="IA3"), "besides the IA3 adapter's own"),
    ("unnamed saved module", edit_tensors(with_extra(".modules_to_save.weight", (64, 64))), "modules_to_save does not"),
    ("saved module misfit", saved_head((64, 64)), "ext: the saved lm_head.weight is (64, 64), the base's ("),
    ("lora_bias", edit_tensors(with_extra(".lora_B.bias", (64,))), "serving would drop silently"),
    ("base bias", edit_tensors(with_extra(".bias", (64,))), "serving would drop silently"),
    ("activated LoRA", edit_config(alora_invocation_tokens=[5, 6]), "ext: alora_invocation_tokens is set"),
    ("base copy not the base's", edit_tensors(with_extra(".base_layer.weight", (64, 64))), "not the base's ([64, 64]"),
]


@pytest.mark.parametrize(("what", "change", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_refused_and_nothing_published(good_dir, tmp_path, cli_config, capsys, what, change, message):
    bad = variant(good_dir, tmp_path, change)
    assert main(["adapters", "import", "ext", "--from", str(bad), "--config", cli_config]) == 2
    assert message in capsys.readouterr().err
    assert AdapterStore(str(tmp_path / "store")).names() == []


@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_adapter_of_another_shape_is_refused(tmp_path, cli_config, capsys, kind):
    oft = OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"]) if kind == "oft" else None
    base = str(build_tiny_llama(tmp_path / "wide", hidden=128))
    wide = save_peft_dir(base, tmp_path / "wide-adapter", config=oft)
    assert main(["adapters", "import", "ext", "--from", str(wide), "--config", cli_config]) == 2
    assert "ext@0: weights do not fit this base model" in capsys.readouterr().err
    assert AdapterStore(str(tmp_path / "store")).names() == []


def test_good_adapter_imports_and_outputs_match(good_dir, tmp_path, cli_config, tiny_model):
    from peft import PeftModel

    assert main(["adapters", "import", "ext", "--from", str(good_dir), "--config", cli_config]) == 0
    store = AdapterStore(str(tmp_path / "store"))
    assert store.manifest("ext").lineage["imported_from"] == str(good_dir)
    from madapt.lora import attach

    ids = torch.tensor([[1, 2, 3, 4]])
    ours = attach(load_base(tiny_model).model, store.open("ext"))
    theirs = PeftModel.from_pretrained(load_base(tiny_model).model, good_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


UNSLOTH_TARGETS = (  # the regular expression Unsloth saves as target_modules for a Llama (PEFT's string form)
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}\."
    r"(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)))"
)


@pytest.mark.parametrize(
    ("targets", "options"),
    [
        (UNSLOTH_TARGETS, {}),
        (r".*\.(q_proj|o_proj)", {}),
        (["embed_tokens", "q_proj"], {}),
        (["lm_head", "v_proj"], {}),
        (["q_proj", "v_proj"], {"lora_bias": True}),
    ],
    ids=["unsloth regex", "regex", "embedding", "output head", "lora_bias"],
)
def test_adapters_as_users_bring_them_import_and_serve_as_peft_applies_them(
    tmp_path, cli_config, tiny_model, targets, options
):
    """Targets as a regular expression (PEFT's string form); LoRA on the embedding or output layer, which PEFT
    saves with a copy of the base's weight (dropped at import: it is the base's own); a declared lora_bias."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
    stored = import_and_serve_as_peft(tmp_path, cli_config, tiny_model, config)
    assert stored.config["target_modules"] == targets or sorted(stored.config["target_modules"]) == sorted(targets)
    assert not [key for key in stored.tensors if key.endswith(".base_layer.weight")]


@pytest.mark.parametrize(
    "config",
    [
        RandLoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        ShiraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        MissConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ],
    ids=["randlora", "shira", "miss"],
)
def test_a_layer_tuner_madapt_does_not_train_imports_and_serves_on_peft_s_own_layers(
    tmp_path, cli_config, tiny_model, config
):
    import_and_serve_as_peft(tmp_path, cli_config, tiny_model, config)


def import_and_serve_as_peft(tmp_path: Path, cli_config: str, tiny_model: str, config: PeftConfig):
    """Save `config`'s adapter with PEFT, import it, and check that a replica's engine gives PEFT's own greedy
    tokens; the stored adapter."""
    from peft import PeftModel

    from madapt.serve.engine import Engine, Row
    from madapt.serve.multilora import MultiLora, served_adapter

    source = save_peft_dir(tiny_model, tmp_path / "brought", config=config)
    assert main(["adapters", "import", "ext", "--from", str(source), "--config", cli_config]) == 0
    stored = AdapterStore(str(tmp_path / "store")).open("ext")
    prompt = [1, 2, 3, 4, 5]
    theirs = PeftModel.from_pretrained(load_base(tiny_model).model, source)
    want: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            want.append(int(theirs(input_ids=torch.tensor([prompt + want])).logits[0, -1].argmax()))
    base = load_base(tiny_model)
    lora = MultiLora(base.model)
    engine = Engine(lora, base.tokenizer, context_length=64)
    engine.eos = set()
    row = Row(prompt_ids=prompt, slot=lora.load(served_adapter("ext", stored.config, stored.tensors)), max_tokens=4)
    engine.generate([row])
    assert row.ids == want
    return stored


def test_an_adapter_whose_keys_name_peft_s_default_adapter_imports_as_save_pretrained_writes_it(
    good_dir, tmp_path, cli_config, tiny_model
):
    """A state dict taken from a live PeftModel (`lora_A.default.weight`): PEFT's loader takes it, so does import."""
    from peft import PeftModel

    def named(tensors):
        return {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}

    source = variant(good_dir, tmp_path, edit_tensors(named))
    assert main(["adapters", "import", "ext", "--from", str(source), "--config", cli_config]) == 0
    stored = AdapterStore(str(tmp_path / "store")).open("ext")
    assert sorted(stored.tensors) == sorted(load_file(good_dir / "adapter_model.safetensors"))
    from madapt.lora import attach

    ids = torch.tensor([[1, 2, 3, 4]])
    ours = attach(load_base(tiny_model).model, stored)
    theirs = PeftModel.from_pretrained(load_base(tiny_model).model, source)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_bad_name_is_refused(good_dir, cli_config, capsys):
    assert main(["adapters", "import", "../x", "--from", str(good_dir), "--config", cli_config]) == 2
    assert "invalid adapter" in capsys.readouterr().err
