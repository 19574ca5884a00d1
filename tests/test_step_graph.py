"""Micro-batches replayed as CUDA graphs (ftcli/step_graph.py) against the same micro-batches run op by op: the same
losses and gradients over two steps of two micro-batches each (different tokens, ignored labels, gradients adding up
within a step, a shape first met mid-step, the adapters changed in place between steps), under plain and offloaded
checkpointing, with the kernels (on a GPU only: CUDA graphs need one); `ftcli train` with and without graphs (GPU),
packed rows and evaluation included; where train.cuda_graphs applies, how a graphed micro-batch is padded and that
its memory is planned at that width; and the maskless causal attention a captured model attends through, against
its own SDPA attention, where it applies and where a sliding window rules it out, and over right-padded rows against
the padding mask."""

import json

import pytest
import torch
from rich.console import Console

import ftcli.step_graph
import ftcli.train
from conftest import DEVICE, lora_model, run_cli, write_jsonl, write_recipe
from ftcli.architectures import ARCHITECTURES
from ftcli.data.templates import TokenizedExample
from ftcli.attention_replay import replay_attention
from ftcli.errors import RecipeError
from ftcli.plan import CheckpointingChoice
from ftcli.progress import TrainingDisplay
from ftcli.recipe import TrainSettings, load_recipe
from ftcli.step_graph import (BUCKET_TOKENS, CAUSAL_ATTENTION, GRAPHED_TOKENS, GraphedMicroBatch, bucket_width,
                              causal_attention, settle_cuda_graphs)
from ftcli.train import SupervisedMethod, batch_tokens, collate, summed_token_loss, target_tokens


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """Four batches, a fifth of labels ignored, of two shapes in the order A B B A: B is captured while the gradients
    hold A's, and the two graphs, which share their memory, are replayed in the other order in the second step."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for length in (16, 12, 12, 16):
        input_ids = torch.randint(3, 300, (2, length), generator=generator)
        labels = input_ids.clone()
        labels[torch.rand(labels.shape, generator=generator) < 0.2] = -100
        batches.append({"input_ids": input_ids.to(DEVICE), "labels": labels.to(DEVICE)})
    return batches


def train(model, run_micro_batch) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Two steps of two micro-batches; after each step the gradients are read, zeroed in place, and the adapters
    moved as an optimizer would."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches, losses, grads = micro_batches(), [], []
    for step in range(2):
        pair = batches[2 * step:2 * step + 2]
        targets = sum(target_tokens(batch) for batch in pair)
        for batch in pair:
            losses.append(float(run_micro_batch(batch, 1 / targets)))
        grads.append([p.grad.clone() for p in trainable])
        with torch.no_grad():
            for p in trainable:
                p.grad.zero_()
                p.add_(p.grad.new_full(p.shape, 0.01 * (step + 1)))
    return losses, grads


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("checkpointing, dropout", [(True, 0.0), ("offload", 0.0), (True, 0.1), ("offload", 0.1)])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_graph_replays_give_the_eager_losses_and_gradients(family, checkpointing, dropout, tiny_model_folder):
    """With LoRA dropout, from the same random state: a replay draws the eager run's masks (the warm-up's draws are
    undone), and the recompute of a checkpointed layer draws its forward's, or the gradients would differ."""
    def eager(model):
        def run(batch, scale):
            loss = summed_token_loss(model, batch, fused=True) * scale
            loss.backward()
            return loss
        return run

    def model_from_seed():
        model, _ = lora_model(tiny_model_folder(family), family, kernels=True, checkpointing=checkpointing,
                              device=DEVICE, dropout=dropout)
        torch.cuda.manual_seed(11)
        return model

    model = model_from_seed()
    want_losses, want_grads = train(model, eager(model))

    model = model_from_seed()
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphed = GraphedMicroBatch(model, lambda batch: summed_token_loss(model, batch, fused=True), trainable)
    losses, grads = train(model, graphed)

    assert len(graphed._graphs) == 2  # each shape captured once, replayed twice
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert len(set(losses)) == 4  # each replay read its own batch
    for step_grads, step_want in zip(grads, want_grads):
        for grad, want in zip(step_grads, step_want):
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in grads[1])


@pytest.mark.parametrize("family, length, padded, used", [
    ("llama", 24, False, True), ("llama", 24, True, False), ("mistral", 24, False, False), ("mistral", 12, False, True),
    ("gemma3_text", 24, False, False), ("gemma3_text", 12, False, True)])
def test_causal_attention_gives_the_models_own_logits_where_it_applies(family, length, padded, used, tiny_model_folder):
    """The tiny Mistral and Gemma 3 have a sliding window of 16 tokens (tests/tiny_models.py), Mistral's in every
    layer (its config names no layer kinds), Gemma 3's in every other: over 24 tokens a maskless causal attention
    would be wrong, so the model keeps its own; over 12 the window changes nothing. A padded batch keeps its mask."""
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    model.config.get_text_config()._attn_implementation = "sdpa"
    input_ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids}
    if padded:
        batch["attention_mask"] = torch.ones_like(input_ids)
        batch["attention_mask"][1, length // 2:] = 0
    with torch.no_grad():
        want = model(**batch).logits
        with causal_attention(model, batch):
            implementation = model.config.get_text_config()._attn_implementation
            logits = model(**batch).logits
    assert (implementation == CAUSAL_ATTENTION) == used
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_right_padded_rows_need_no_mask(family, tiny_model_folder):
    """Rows padded on the right, as SupervisedMethod.collate hands a graph, with their mask kept only as
    `padding_mask`: attending without a mask (maskless causal for Llama; the model's own causal sliding attention for
    Mistral and Gemma 3, whose window of 16 is shorter than the 24 tokens), the loss and gradients are those of the
    masked batch, in float32 within the roundings of the two attention paths; the tokens counted the same."""
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    model.config.get_text_config()._attn_implementation = "sdpa"
    generator = torch.Generator().manual_seed(5)
    examples = [TokenizedExample(input_ids=ids, labels=[-100] * 3 + ids[3:], truncated=False)
                for ids in (torch.randint(3, 300, (n,), generator=generator).tolist() for n in (24, 9))]
    masked = collate(examples, 0, CPU)
    unmasked = {name: tensor for name, tensor in masked.items() if name != "attention_mask"}
    unmasked["padding_mask"] = masked["attention_mask"]
    results = []
    for batch in (masked, unmasked):
        with causal_attention(model, batch):
            implementation = model.config.get_text_config()._attn_implementation
            loss = summed_token_loss(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), grads, implementation))
        model.zero_grad(set_to_none=True)
    (want_loss, want_grads, want_implementation), (loss, grads, implementation) = results
    assert want_implementation == "sdpa" and implementation == ("sdpa" if family != "llama" else CAUSAL_ATTENTION)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert batch_tokens(unmasked) == batch_tokens(masked) == 33


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


LLAMA, GEMMA2 = ARCHITECTURES["llama"], ARCHITECTURES["gemma2"]


def test_cuda_graphs_auto_is_on_only_where_graphs_run():
    assert settle_cuda_graphs("auto", "sft", CUDA, torch.bfloat16, 1, LLAMA)
    assert settle_cuda_graphs("auto", "sft", CUDA, torch.float32, 1, LLAMA)
    assert not settle_cuda_graphs("auto", "sft", CPU, torch.float32, 1, LLAMA)
    assert not settle_cuda_graphs("auto", "dpo", CUDA, torch.bfloat16, 1, LLAMA)
    assert not settle_cuda_graphs("auto", "sft", CUDA, torch.float16, 1, LLAMA)
    assert not settle_cuda_graphs("auto", "sft", CUDA, torch.bfloat16, 2, LLAMA)
    assert not settle_cuda_graphs("auto", "sft", CUDA, torch.bfloat16, 1, GEMMA2)
    assert not settle_cuda_graphs(False, "sft", CUDA, torch.bfloat16, 1, LLAMA)


@pytest.mark.parametrize("device, method, dtype, processes, architecture, why", [
    (CPU, "sft", torch.float32, 1, LLAMA, "there is no CUDA GPU here"),
    (CUDA, "grpo", torch.bfloat16, 1, LLAMA, "train.method is grpo"),
    (CUDA, "sft", torch.float16, 1, LLAMA, "the run computes in float16"),
    (CUDA, "sft", torch.bfloat16, 2, LLAMA, "2 processes train"),
    (CUDA, "sft", torch.bfloat16, 1, GEMMA2, "Gemma 2 attends through transformers' eager attention"),
])
def test_cuda_graphs_true_where_they_cannot_run_says_why(device, method, dtype, processes, architecture, why):
    with pytest.raises(RecipeError) as raised:
        settle_cuda_graphs(True, method, device, dtype, processes, architecture)
    assert f"train.cuda_graphs is true, but {why}" in str(raised.value)
    assert "Set train.cuda_graphs: auto (or false)" in str(raised.value)


def test_the_recipe_reference_gives_the_bucket_width_and_the_token_limit_of_graphs():
    """The recipe module cannot import step_graph (it would load transformers), so the numbers it states are held to
    BUCKET_TOKENS and GRAPHED_TOKENS here."""
    description = TrainSettings.model_fields["cuda_graphs"].description
    assert f"a multiple of {BUCKET_TOKENS} tokens" in description
    assert f"more than {GRAPHED_TOKENS:,} tokens" in description


@pytest.mark.parametrize("width, limit, bucket", [(1, 2048, 256), (256, 2048, 256), (257, 2048, 512),
                                                  (2000, 2048, 2048), (2049, 2100, 2100), (300, 300, 300)])
def test_rows_pad_up_to_a_multiple_of_256_tokens_within_the_limit(width, limit, bucket):
    assert bucket_width(width, limit) == bucket


def test_a_graphed_micro_batch_is_padded_to_its_bucket_and_gives_the_model_no_mask(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello"}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out",
                                      model={"max_seq_length": 300}))
    method = SupervisedMethod(recipe, pad_id=0, device=CPU, fused=False)
    method.replay_as_graphs(torch.nn.Linear(1, 1), [], recipe.example_length_limit())
    short, long = (TokenizedExample(input_ids=[5] * n, labels=[5] * n, truncated=False) for n in (3, 270))
    padded = method.collate([short, long])
    assert padded["input_ids"].shape == (2, 300) and padded["padding_mask"].sum() == 273
    full = method.collate([TokenizedExample(input_ids=[5] * 256, labels=[5] * 256, truncated=False)] * 2)
    assert full["input_ids"].shape == (2, 256) and full["padding_mask"].sum() == 512
    assert "attention_mask" not in padded and "attention_mask" not in full
    assert batch_tokens(full) == 512 and batch_tokens(padded) == 273


def test_a_micro_batch_over_the_graphed_tokens_is_collated_as_without_graphs(tmp_path, tiny_model_folder,
                                                                            monkeypatch):
    monkeypatch.setattr(ftcli.step_graph, "GRAPHED_TOKENS", 512)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello"}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out",
                                      model={"max_seq_length": 300}))
    method = SupervisedMethod(recipe, pad_id=0, device=CPU, fused=False)
    method.replay_as_graphs(torch.nn.Linear(1, 1), [], recipe.example_length_limit())
    rows = [TokenizedExample(input_ids=[5] * n, labels=[5] * n, truncated=False) for n in (3, 270)]
    assert method.collate(rows[:1])["input_ids"].shape == (1, 256)  # 256 tokens: graphed, padded to its bucket
    eager = method.collate(rows)  # 2 x 300 after padding: op by op, padded to its longest row only
    assert eager["input_ids"].shape == (2, 270) and eager["attention_mask"].sum() == 273


def test_a_micro_batch_over_the_graphed_tokens_runs_op_by_op(tiny_model_folder, monkeypatch):
    """No capture is tried (on the CPU it would fail): the loss and gradients are the eager ones, added into the
    gradients already there, as replays add."""
    monkeypatch.setattr(ftcli.step_graph, "GRAPHED_TOKENS", 16)
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = micro_batches()[0]  # 2 x 16 tokens
    batch = {name: tensor.cpu() for name, tensor in batch.items()}
    want = summed_token_loss(model, batch) * 0.5
    want.backward()
    want_grads = [p.grad.clone() for p in trainable]
    graphed = GraphedMicroBatch(model, lambda rows: summed_token_loss(model, rows), trainable)
    loss = graphed(batch, 0.5)
    assert not graphed._graphs and not loss.requires_grad
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    for grad, once in zip((p.grad for p in trainable), want_grads):
        torch.testing.assert_close(grad, 2 * once)


class Planned(Exception):
    """Stops a run once it has settled its checkpointing, before it loads the model."""


def test_a_graphed_run_plans_memory_for_its_longest_rows_padded_to_their_bucket(tmp_path, tiny_model_folder,
                                                                                monkeypatch):
    """auto checkpointing, the layers kept on the GPU and the out-of-memory advice are settled for the longest
    micro-batch the GPU will run: graphed, the longest row padded up to its bucket."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello there, " * n} for n in (1, 5)])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out",
                                      model={"max_seq_length": 300}, data={"format": "text"}))
    planned = []

    def settle_checkpointing(recipe, config, gpu_bytes, host_bytes, longest, *rest):
        planned.append(longest)
        raise Planned

    monkeypatch.setattr(ftcli.train, "settle_checkpointing", settle_checkpointing)
    for graphs in (False, True):
        monkeypatch.setattr(ftcli.train, "settle_cuda_graphs", lambda *settings: graphs)
        with pytest.raises(Planned):
            ftcli.train.run(recipe, tmp_path / "out", TrainingDisplay(Console(), enabled=False))
    assert 1 < planned[0] < 256 and planned[1] == 256


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("kernels, checkpointing, dropout, packing, replayed", [
    (False, False, 0.0, False, False), (True, "offload", 0.0, False, False), (True, True, 0.1, False, False),
    (True, "offload", 0.1, False, False), (True, True, 0.0, True, False), (True, "offload", 0.0, False, True),
    (True, True, 0.0, False, True)])
def test_training_with_graphs_gives_the_losses_of_training_without(kernels, checkpointing, dropout, packing, replayed,
                                                                   tmp_path, tiny_model_folder, monkeypatch):
    """Rows of several lengths (padded batches of two buckets, which graphs attend without a mask; or packed rows,
    whose position ids restart), two micro-batches a step, and an evaluation every two steps, which runs op by op
    between replays. LoRA dropout draws its masks over the padded batch, which graphs pad to 256 tokens and eager
    steps to the longest row, so with dropout the losses only stay close (the masks themselves:
    test_graph_replays_give_the_eager_losses_and_gradients). `replayed`: the graphed run replays attention in both
    layers' recompute and dequantizes the MLP weights once, as a plan with room picks them."""
    rows = [{"messages": [{"role": "user", "content": "Count " * n}, {"role": "assistant", "content": "ok " * n}]}
            for n in (3, 40, 7, 90, 12, 60, 5, 150, 20, 30)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settle = ftcli.train.settle_checkpointing
    marked = []  # layers whose attention replay_attention marked, per run

    def marking(model, layers):
        marked.append(replay_attention(model, layers))
        return marked[-1]

    monkeypatch.setattr(ftcli.train, "replay_attention", marking)

    def losses(graphs) -> tuple[list[float], list[float]]:
        recipe = write_recipe(tmp_path / f"{graphs}.yaml", tiny_model_folder("llama"), data, tmp_path / str(graphs),
                              model={"kernels": kernels, "max_seq_length": 512}, lora={"dropout": dropout},
                              data={"packing": packing, "eval_fraction": 0.2},
                              train={"cuda_graphs": graphs, "grad_accum": 2, "max_steps": 4, "eval_steps": 2,
                                     "gradient_checkpointing": checkpointing})
        planned = CheckpointingChoice(checkpointing, 0, 0, 0, 2, True) if replayed and graphs else None
        monkeypatch.setattr(ftcli.train, "settle_checkpointing", (lambda *args: planned) if planned else settle)
        result = run_cli("train", recipe, "--json")
        assert result.exit_code == 0, result.output
        assert marked == ([2] if planned else [])
        marked.clear()
        metrics = [json.loads(line) for line in (tmp_path / str(graphs) / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in metrics], [row["eval_loss"] for row in metrics if "eval_loss" in row]

    (train_losses, eval_losses), (want_train, want_eval) = losses(True), losses(False)
    # Without dropout, within bfloat16's rounding: the graphed padded batches attend through the maskless causal kernel,
    # the eager ones through SDPA's masked one (packed rows through the same masked one: closer)
    tolerance = (1e-4 if packing else 5e-3) if dropout == 0 else 0.05
    assert len(train_losses) == 4 and train_losses == pytest.approx(want_train, rel=tolerance)
    assert len(eval_losses) == 2 and eval_losses == pytest.approx(want_eval, rel=tolerance)
