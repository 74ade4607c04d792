"""`madapt plan` against published figures and against real models: parameter counts from the model cards
and PEFT's printouts, LoRA sizes counted by PEFT itself, and the maths of sharding and quantisation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from madapt.api import Model
from madapt.cli import main
from madapt.config import parse_config
from madapt.models import EMBEDDED_MODELS, resolve_base_model
from madapt.plan import (
    ALIASES,
    GB,
    GPUS,
    KNOWN,
    USABLE,
    AdapterShape,
    PlanError,
    architecture,
    make_plan,
    pack_estimate,
    plan_for_base,
    split_packs,
    worker_memory,
)
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # PEFT's print_trainable_parameters on these bases: "all params" minus the LoRA share.
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("meta-llama/Llama-3.1-70B", 70_553_706_496),
        ("meta-llama/Llama-3.2-1B", 1_235_814_400),
        ("meta-llama/Llama-3.2-3B", 3_212_749_824),
        ("HuggingFaceTB/SmolLM2-135M", 134_515_008),
    ],
)
def test_parameter_counts_match_published_figures(name, params):
    assert architecture(name).params == params


def test_weight_sizes_match_published_figures():
    """Llama-3.1-8B is ~16 GB in bf16 and ~5.7 GB loaded in 4-bit; 70B is ~141 GB in bf16."""
    llama8, llama70 = architecture("meta-llama/Llama-3.1-8B"), architecture("meta-llama/Llama-3.1-70B")
    assert llama8.weight_bytes(16) / GB == pytest.approx(16.06, abs=0.01)
    assert llama8.weight_bytes(4) / GB == pytest.approx(5.7, abs=0.2)
    assert llama70.weight_bytes(16) / GB == pytest.approx(141.1, abs=0.1)
    # 4-bit shrinks only the decoder's linear layers: the 8B's 2.1 GB of bf16 embeddings and head stay.
    assert llama8.weight_bytes(4) - llama8.embedding_params * 2 == pytest.approx(
        llama8.num_layers * llama8.layer_linear_params * 0.5159, rel=1e-3
    )


def test_lora_sizes_match_pefts_counts_for_llama_3_8b():
    """PEFT prints 'trainable params: 6,815,744' (r=16) and '3,407,872' (r=8) for q_proj,v_proj."""
    arch = architecture("meta-llama/Llama-3.1-8B")
    assert arch.lora_params(16, ["q_proj", "v_proj"]) == 6_815_744
    assert arch.lora_params(8, ["q_proj", "v_proj"]) == 3_407_872


def test_local_config_json_sizes_a_real_model_exactly(tiny_model):
    """A local directory is read from its config.json; counts equal the loaded model's and PEFT's."""
    arch = architecture(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert arch.params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=ALL_MODULES))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(4, ALL_MODULES) == trainable


def test_embedded_base_matches_its_table_entry_and_its_weights_file():
    directory = Path(resolve_base_model("smollm2-135m"))
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        names = weights.keys()
        stored = sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    assert architecture(str(directory)).params == stored == architecture("smollm2-135m").params
    assert set(ALIASES) == set(EMBEDDED_MODELS), "every embedded base needs a plan alias"


def test_names_resolve_case_and_instruct_insensitively_and_unknown_ones_are_named():
    assert architecture("Llama-3.1-8B-Instruct") is KNOWN["meta-llama/llama-3.1-8b"]
    with pytest.raises(PlanError, match=r"unknown base_model 'gpt-9'.*config\.json"):
        architecture("gpt-9")
    with pytest.raises(PlanError, match=r"cannot size target_modules \['c_attn'\]"):
        architecture("smollm2-135m").lora_params(8, ["c_attn"])


def test_fsdp_shards_weights_zero2_shards_lora_state_and_4_bit_shrinks_weights():
    arch = architecture("meta-llama/Llama-3.1-8B")
    adapters = [AdapterShape("a", 16, ["q_proj", "v_proj"])]
    one = make_plan(arch, adapters, batch_size=4, max_length=256, workers=1, strategy="ddp")
    eight = make_plan(arch, adapters, batch_size=4, max_length=256, workers=8, strategy="fsdp")
    assert eight.training[16].parts["base weights"] * 8 == pytest.approx(one.training[16].parts["base weights"])
    assert eight.training[16].parts["activations"] == one.training[16].parts["activations"]
    zero2 = make_plan(arch, adapters, batch_size=4, max_length=256, workers=8, strategy="deepspeed2")
    assert zero2.training[16].parts["base weights"] == one.training[16].parts["base weights"]
    lora_state = "LoRA weights + grads + Adam"
    assert zero2.training[16].parts[lora_state] * 8 == pytest.approx(one.training[16].parts[lora_state])
    assert one.training[4].total < one.training[16].total
    assert one.serving[16].parts["base weights"] == arch.weight_bytes(16)


def test_fewest_gpus_agree_with_known_practice():
    """QLoRA trains a 70B base on one 80 GB GPU; in bf16 its 141 GB of weights need several. An 8B base
    serves from one 24 GB GPU in bf16; a 70B base needs 4-bit and an 80 GB GPU."""
    plan70, plan8 = plan_for_base("meta-llama/Llama-3.1-70B"), plan_for_base("meta-llama/Llama-3.1-8B")
    assert plan70.fewest_gpus[4]["A100 / H100 80GB"] == 1
    assert plan70.fewest_gpus[16]["A100 / H100 80GB"] > 1
    assert plan8.serving[16].fits(GPUS["A10G 24GB / L4 24GB"])
    assert not plan70.serving[16].fits(GPUS["H200 141GB"]) and plan70.serving[4].fits(GPUS["A100 / H100 80GB"])


def test_plan_command_prints_both_precisions_for_a_config(capsys):
    assert main(["plan", str(ROOT / "examples/cluster.yaml")]) == 0
    out = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B: 8.03B parameters" in out
    assert "8 worker(s) (fsdp), batch 8 x 128 tokens" in out
    assert "16.06GB" in out and "5.70GB" in out and "coding_chat r=16" in out
    assert "training coding, chat as one pack (madapt train --pack), per GPU, 16 rows x 128 tokens" in out


def test_plan_command_needs_exactly_one_source(capsys):
    assert main(["plan"]) == 2
    assert main(["plan", str(ROOT / "examples/cluster.yaml"), "--base-model", "Llama-3.2-1B"]) == 2
    assert "either a CONFIG or --base-model" in capsys.readouterr().err
    assert main(["plan", "--base-model", "Llama-3.2-1B"]) == 0


def test_a_pack_is_sized_with_one_base_every_adapters_state_and_its_capped_rows(tiny_model, tmp_path):
    """The pack holds the base once, each adapter's LoRA state, and the rows of one forward up to the cap."""
    config = parse_config(tiny_config(tiny_model, str(tmp_path)))
    arch = architecture(tiny_model)
    one, both = pack_estimate(config, ["coding"]), pack_estimate(config, ["coding", "chat"])
    assert both.parts["base weights"] == one.parts["base weights"] == 2 * arch.weight_bytes(16)  # fp32 on CPU
    lora = arch.lora_params(8, ["q_proj", "v_proj"]) + arch.lora_params(4, ["q_proj", "v_proj"])
    assert both.parts["LoRA weights + grads + Adam"] == lora * 16
    assert both.parts["activations"] == one.parts["activations"]  # CPU: one lane batch (8 rows) a forward
    raised = config.model_copy(deep=True)
    raised.backend.trainer.pack_max_rows = 32
    assert pack_estimate(raised, ["coding", "chat"]).parts["activations"] == 2 * one.parts["activations"]
    raised.backend.trainer.pack_max_rows, raised.backend.trainer.use_gpu = None, True  # up to 4 batches, bf16
    assert pack_estimate(raised, ["coding", "chat"]).parts["activations"] == one.parts["activations"]


def test_a_pack_too_large_for_its_worker_is_split_and_said_before_training(tiny_model, tmp_path, capsys):
    document = tiny_config(tiny_model, str(tmp_path))
    document["backend"]["trainer"] = {"pack_memory": "100GB", "pack_max_rows": 64}  # rows grow with the pack
    config = parse_config(document)
    names = ["coding", "chat"]
    one = pack_estimate(config, ["coding"]).total / USABLE
    assert split_packs(config, names, 100 * GB) == [names]
    assert split_packs(config, names, one * 1.001) == [["coding"], ["chat"]]
    assert Model(config).packs_that_fit(names) == [names]
    document["backend"]["trainer"]["pack_memory"] = f"{one * 1.001 / 2**20:.3f} MiB"
    assert Model(parse_config(document)).packs_that_fit(names) == [["coding"], ["chat"]]
    said = capsys.readouterr().out
    assert "pack too large for backend.trainer.pack_memory" in said and "split into [coding] and [chat]" in said
    document["backend"]["trainer"] = {"use_gpu": True}
    assert worker_memory(parse_config(document)) is None  # the GPU is unknown at the driver: one pack
