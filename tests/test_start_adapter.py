"""model.adapter: a run that starts from an earlier run's adapter, its errors, resume, and the reference adapter."""

import json
import shutil

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEVICE, assert_clean_failure, make_output_folder, randomise, run_cli, write_jsonl, write_recipe
from test_patch_lora import assert_same_training, batch
from test_resume import CHAT_ROWS, RESUMABLE, adapter, interrupted_run, losses
from ftcli.architectures import ARCHITECTURES
from ftcli.data import prepare_data
from ftcli.loader import REFERENCE_ADAPTER, TRAINED_ADAPTER, add_lora, load_reference_adapter, reference_adapter
from ftcli.owned_folders import TRAINING_RUN, write_marker
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import LoraSettings, load_recipe
from ftcli.steps import count_steps, step_groups
from ftcli.train import collate, prepare_for_training, summed_token_loss, target_tokens


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    """A tiny Llama, chat data, and `start`: an output folder as `ftcli train` leaves it (r 4, alpha 8, B non-zero)."""
    base = tiny_model_folder("llama")
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    start = make_output_folder(base, tmp_path / "start")
    return tmp_path, base, data, start


def recipe_from(tmp, base, data, start):
    """A recipe into tmp/out that starts from `start` and leaves the lora section out, so the adapter's settings
    apply."""
    path = write_recipe(tmp / "out.yaml", base, data, tmp / "out", model={"adapter": str(start)})
    recipe = yaml.safe_load(path.read_text())
    del recipe["lora"]
    path.write_text(yaml.safe_dump(recipe))
    return path


def first_step_loss(recipe, model) -> float:
    """The mean token loss of the recipe's first optimizer step, computed directly on `model`."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name)
    data = prepare_data(recipe.data, tokenizer, recipe.model.max_seq_length, recipe.train.seed)
    group = next(step_groups(data.train, recipe.train, count_steps(len(data.train), recipe.train)))
    micro_batches = [collate(examples, tokenizer.pad_token_id, torch.device("cpu")) for examples in group]
    with torch.no_grad():
        summed = sum(float(summed_token_loss(model, micro)) for micro in micro_batches)
    return summed / sum(target_tokens(micro) for micro in micro_batches)


def test_training_starts_at_the_adapters_loss_and_saves_a_plain_peft_folder(workspace):
    tmp, base, data, start = workspace
    path = recipe_from(tmp, base, data, start)
    result = run_cli("train", path, "--json")
    assert result.exit_code == 0, result.output

    recipe = load_recipe(path)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_loss = first_step_loss(recipe, plain)
    adapter_loss = first_step_loss(recipe, PeftModel.from_pretrained(plain, start))
    assert abs(adapter_loss - base_loss) > 1e-3  # the control: the adapter changes the loss
    assert losses(tmp / "out")[0] == pytest.approx(adapter_loss, abs=1e-5)

    # the resolved recipe records the adapter and its settings (r 4, alpha 8), not the lora defaults (16, 16)
    saved = yaml.safe_load((tmp / "out" / "recipe.yaml").read_text())
    assert saved["model"]["adapter"] == str(start)
    assert (saved["lora"]["r"], saved["lora"]["alpha"]) == (4, 8.0)
    trained = adapter(tmp / "out")
    started = adapter(start)
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)
    assert not (tmp / "out" / REFERENCE_ADAPTER).exists()

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp / "out")
    for name, tensor in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
    assert json.loads((tmp / "out" / "adapter_config.json").read_text())["r"] == 4
    # the saved recipe runs again unchanged: its lora section now equals the adapter's
    rerun = run_cli("train", tmp / "out" / "recipe.yaml", "--dry-run", "--output", tmp / "again")
    assert rerun.exit_code == 0, rerun.output


def test_chat_and_export_read_a_run_started_from_an_adapter(workspace):
    tmp, base, data, start = workspace
    assert run_cli("train", recipe_from(tmp, base, data, start), "--json").exit_code == 0
    chat = run_cli("chat", tmp / "out", "--prompt", "Say the number 7.", "--temperature", "0", "--max-new-tokens", "4")
    assert chat.exit_code == 0, chat.output
    export = run_cli("export", tmp / "out", "--merged")
    assert export.exit_code == 0, export.output


def test_the_recipe_may_repeat_the_adapters_settings_and_change_its_dropout(workspace):
    tmp, base, data, start = workspace
    path = recipe_from(tmp, base, data, start)
    same = ["--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.target_modules=[q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj, down_proj]", "--set", "lora.dropout=0.1"]
    assert run_cli("train", path, "--dry-run", *same).exit_code == 0
    result = run_cli("train", path, "--dry-run", "--set", "lora.r=8", "--set", "lora.target_modules=[q_proj]")
    assert_clean_failure(result, 2, "lora.r is 8 in the recipe but 4 in the adapter",
                         "lora.target_modules adapts ['q_proj'] in the recipe", f"model.adapter {start}",
                         "remove those fields from the lora section")


def ia3_adapter(base, folder):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])).save_pretrained(folder)
    return folder


def lora_adapter(base, folder, **settings):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, **settings)).save_pretrained(folder)
    return folder


def qwen3_adapter(tiny_model_folder, folder):
    """A plain PEFT folder (no recipe.yaml) of a Qwen3, whose q_proj is twice as wide as the tiny Llama's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("qwen3"), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def only_bin(start, folder):
    shutil.copytree(start, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return folder


def truncated(start, folder):
    shutil.copytree(start, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    return folder


def not_a_folder(start, folder):
    return folder


def random_folder(start, folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


BAD_ADAPTERS = {
    "missing": (not_a_folder, ["does not exist or is not a folder"]),
    "random folder": (random_folder, ["has no adapter_config.json", "not an adapter folder"]),
    "only .bin": (only_bin, ["no adapter_model.safetensors, only adapter_model.bin", "save it again"]),
    "damaged weights": (truncated, ["adapter_model.safetensors cannot be read", "damaged"]),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_folder_that_is_not_a_usable_adapter_is_a_clean_error(workspace, case):
    tmp, base, data, start = workspace
    make, fragments = BAD_ADAPTERS[case]
    folder = make(start, tmp / "bad")
    result = run_cli("train", recipe_from(tmp, base, data, folder), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {folder}" if case != "damaged weights" else str(folder),
                         *fragments)


def test_a_merged_model_and_adapters_ftcli_cannot_train_are_refused_with_the_fix(workspace, tiny_model_folder):
    tmp, base, data, start = workspace
    result = run_cli("train", recipe_from(tmp, base, data, base), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {base} has no adapter_config.json",
                         "not an adapter. A merged export already holds its adapter: give it as model.name")
    ia3 = ia3_adapter(base, tmp / "ia3")
    result = run_cli("train", recipe_from(tmp, base, data, ia3), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {ia3} holds a IA3 adapter", "not a LoRA adapter")
    dora = lora_adapter(base, tmp / "dora", target_modules=["q_proj"], use_dora=True)
    result = run_cli("train", recipe_from(tmp, base, data, dora), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {dora} uses peft's use_dora", "plain LoRA adapter")
    embeddings = lora_adapter(base, tmp / "embeddings", target_modules=["q_proj", "embed_tokens"])
    result = run_cli("train", recipe_from(tmp, base, data, embeddings), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {embeddings} adapts ['embed_tokens', 'q_proj']",
                         "adapts layers ftcli does not train")


def test_an_adapter_of_another_base_is_refused_by_name_and_by_shape(workspace, tiny_model_folder):
    tmp, base, data, start = workspace
    mistral = tiny_model_folder("mistral")
    result = run_cli("train", recipe_from(tmp, mistral, data, start), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {start} was trained on {str(base)!r}",
                         f"this recipe's model.name is {str(mistral)!r}", f"Set model.name to {str(base)!r}")
    # the same base through another path is the same model
    (tmp / "link").symlink_to(base)
    assert run_cli("train", recipe_from(tmp, tmp / "link", data, start), "--dry-run").exit_code == 0

    other = qwen3_adapter(tiny_model_folder, tmp / "qwen3-adapter")
    for flags in (["--dry-run"], []):  # the real run checks before loading weights too: no size-mismatch traceback
        result = run_cli("train", recipe_from(tmp, base, data, other), *flags)
        assert_clean_failure(result, 2, f"model.adapter {other} does not fit model.name {str(base)!r}",
                             "q_proj.lora_B.weight has shape [128, 4], where this model needs [64, 4]",
                             "trained on another base model")


def test_the_output_folder_may_not_be_the_adapter_it_starts_from(workspace):
    tmp, base, data, start = workspace
    write_marker(start, TRAINING_RUN)  # an ftcli run folder, which output.overwrite may replace
    path = recipe_from(tmp, base, data, start)
    before = adapter(start)
    for flags in (["--dry-run"], []):
        result = run_cli("train", path, "--output", start, "--set", "output.overwrite=true", *flags)
        assert_clean_failure(result, 2, f"model.adapter {start} is the output folder {start}", "--output")
    result = run_cli("train", path, "--output", tmp, "--dry-run")  # a folder holding the adapter
    assert_clean_failure(result, 2, f"model.adapter {start} is inside the output folder {tmp}")
    after = adapter(start)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_resume_of_a_run_from_an_adapter_continues_as_an_uninterrupted_one(workspace):
    tmp, base, data, start = workspace
    sections = {"model": {"adapter": str(start)}}  # RESUMABLE's lora repeats the adapter's r and alpha, dropout 0.1
    whole = write_recipe(tmp / "whole.yaml", base, data, tmp / "whole", **RESUMABLE, **sections)
    assert run_cli("train", whole, "--json").exit_code == 0
    path = interrupted_run(tmp, base, data, stop_after=5, **sections)
    changed = run_cli("train", path, "--resume", "--set", "model.adapter=null")
    assert_clean_failure(changed, 2, f"model.adapter was {str(start)!r}, now None")
    result = run_cli("train", path, "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["resumed_from_step"] == 5
    assert losses(tmp / "cut") == losses(tmp / "whole")
    final, reference = adapter(tmp / "cut"), adapter(tmp / "whole")
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=0)


def started_model(base, start, dropout: float):
    """The tiny Llama with `start` loaded as ftcli loads model.adapter."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).requires_grad_(False)
    return add_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), ARCHITECTURES["llama"], 0, str(start))


def test_an_adapter_on_a_16_bit_base_trains_in_float32_like_a_new_one(workspace):
    tmp, base, data, start = workspace
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).requires_grad_(False)
    model = add_lora(model, LoraSettings(r=4, alpha=8), ARCHITECTURES["llama"], 0, str(start))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(p.dtype == torch.float32 for p in trainable)  # A, B x 7 x 2 layers


def test_the_reference_adapter_keeps_the_starting_policy_while_the_trained_one_changes(workspace):
    tmp, base, data, start = workspace
    config = json.loads((start / "adapter_config.json").read_text())
    (start / "adapter_config.json").write_text(json.dumps(config | {"lora_dropout": 0.1}))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                             start).eval()(ids).logits
    model = started_model(base, start, dropout=0.1).train()  # dropout 0.1 as the start adapter was trained
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{TRAINED_ADAPTER}." in name for name in trainable)

    load_reference_adapter(model, start)
    assert model.training and model.active_adapters == [TRAINED_ADAPTER]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    randomise(model, f"lora_B.{TRAINED_ADAPTER}", 0.5, seed=3)  # the trained adapter moves away from the start
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)
    with reference_adapter(model):  # in train mode: the reference has no dropout
        for _ in range(2):
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
        assert not torch.is_grad_enabled()
    assert model.active_adapters == [TRAINED_ADAPTER]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable

    # peft's own switch makes the adapter it activates trainable; switching back leaves only the trained one
    model.set_adapter(REFERENCE_ADAPTER)
    model.set_adapter(TRAINED_ADAPTER)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable


def test_a_checkpoint_holds_only_the_trained_adapter_and_may_be_started_from(workspace, tiny_model_folder):
    from ftcli.snapshots import save_snapshot

    tmp, base, data, start = workspace
    model = started_model(base, start, dropout=0.0)
    load_reference_adapter(model, start)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    recipe = load_recipe(recipe_from(tmp, base, data, start))
    (tmp / "run").mkdir()
    saved = save_snapshot(tmp / "run", 1, model, optimizer, None, {}, recipe, keep=1)
    assert not (saved / REFERENCE_ADAPTER).exists()
    assert adapter(saved).keys() == adapter(start).keys()

    # a checkpoint has no recipe.yaml: its trainer_state.json names the base
    assert run_cli("train", recipe_from(tmp, base, data, saved), "--dry-run").exit_code == 0
    mistral = tiny_model_folder("mistral")
    result = run_cli("train", recipe_from(tmp, mistral, data, saved), "--dry-run")
    assert_clean_failure(result, 2, f"model.adapter {saved} was trained on {str(base)!r} (the model.name in its "
                         "trainer_state.json)", f"as model.name in {saved / 'trainer_state.json'}")


def test_kernels_and_checkpointing_train_a_loaded_adapter_as_peft_does_and_switch_to_the_reference(workspace):
    tmp, base, data, start = workspace
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(DEVICE).requires_grad_(False)
    model, swaps = prepare_for_training(model, ARCHITECTURES["llama"], LoraSettings(r=4, alpha=8), kernels=True,
                                        checkpointing=CheckpointingChoice(True), seed=0,
                                        adapter=str(start))
    assert swaps.module_counts["lora_mlp"] == swaps.module_counts["lora_qkv"] == 2  # one of each per layer
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(DEVICE),
                                      start, is_trainable=True)
    assert_same_training(model.train(), plain.train())

    load_reference_adapter(model, start)
    randomise(model, f"lora_B.{TRAINED_ADAPTER}", 0.5, seed=3)
    with torch.no_grad():
        expected = plain(batch()).logits
        assert not torch.allclose(model(batch()).logits, expected, atol=1e-3)
    with reference_adapter(model):
        torch.testing.assert_close(model(batch()).logits, expected, rtol=1e-5, atol=1e-5)
