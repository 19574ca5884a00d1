"""Exported GGUF files in llama.cpp itself (tests/llama_cpp_run.py): llama-quantize makes the same tensors from our
f16 file, llama.cpp tokenizes and computes as transformers does for every family, and it answers a chat with the
file's own template and stop token."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_output_folder
from ftcli.export import default_export_folder, export
from llama_cpp_run import llama_quantize, load, logits
from test_export import TEXT
from test_export_fixture import identity_chats
from tiny_models import FAMILIES, SLIDING_WINDOW

K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def rms_error(tensor, weights: np.ndarray) -> float:
    restored = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float64)
    return float(np.sqrt(np.mean((restored - weights) ** 2)))


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_llama_quantize_makes_the_same_tensors_from_our_f16_file(quickstart_export, tmp_path, type_name):
    """Every tensor gets llama-quantize's type (the _M mixes and the fallbacks for 576-value rows); the legacy types
    are the same bytes; our k-quant super-blocks are mostly the same bytes, and where a near-tie in the scale search
    went the other way (C and torch round sums in a different order) the tensor's error is the same."""
    f16 = quickstart_export / "quickstart-f16.gguf"
    ours = {tensor.name: tensor for tensor in GGUFReader(quickstart_export / f"quickstart-{type_name}.gguf").tensors}
    theirs = {tensor.name: tensor for tensor in GGUFReader(llama_quantize(f16, tmp_path / "q.gguf", type_name)).tensors}
    source = {tensor.name: tensor for tensor in GGUFReader(f16).tensors}
    assert sorted(ours) == sorted(theirs)
    worst = (1.0, 1.0)  # fewest identical super-blocks in a tensor, largest error ratio (ours / llama.cpp's)
    for name, tensor in ours.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        our_bytes, their_bytes = np.asarray(tensor.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)
        if tensor.tensor_type not in K_QUANTS:
            assert np.array_equal(our_bytes, their_bytes), name
            continue
        block_bytes = GGML_QUANT_SIZES[tensor.tensor_type][1]
        identical = (our_bytes.reshape(-1, block_bytes) == their_bytes.reshape(-1, block_bytes)).all(1).mean()
        weights = dequantize(np.asarray(source[name].data), source[name].tensor_type).astype(np.float64)
        worst = (min(worst[0], identical), max(worst[1], rms_error(tensor, weights) / rms_error(theirs[name], weights)))
    print(type_name, worst)
    assert worst[0] >= 0.9 and worst[1] <= 1.002  # measured: at least 0.96 of a tensor's blocks, ratio at most 1.0004


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_computes_the_fixture_files_as_transformers(quickstart_export, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(quickstart_export / "merged")
    sequences, answer = identity_chats(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(quickstart_export / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.cat([merged(torch.tensor([ids])).logits[0] for ids in sequences]).argmax(-1).numpy()
    f16 = load(quickstart_export / "quickstart-f16.gguf")
    for ids in sequences:  # the vocabulary, merges and special tokens written into the file
        assert f16.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids

    def agreement(model) -> tuple[float, float]:
        same = logits(model, sequences).argmax(-1) == expected
        return float(same[answer.numpy()].mean()), float(same.mean())

    ours = agreement(load(quickstart_export / "quickstart-q4_k_m.gguf"))
    theirs = agreement(load(llama_quantize(quickstart_export / "quickstart-f16.gguf", tmp_path / "q.gguf", "q4_k_m")))
    in_f16 = agreement(f16)
    print({"f16": in_f16, "q4_k_m": ours, "llama-quantize q4_k_m": theirs})
    # llama.cpp rounds activations too (f16 for f16 weights, 8-bit for quantized ones), so not quite transformers'
    assert in_f16[0] == 1.0 and in_f16[1] >= 0.99
    assert ours[0] >= 0.98 and abs(ours[1] - theirs[1]) <= 0.02  # as good as llama.cpp's own q4_k_m file


@pytest.mark.slow
def test_llama_cpp_answers_a_chat_with_the_files_template_and_stop_token(quickstart_export):
    model = load(quickstart_export / "quickstart-q4_k_m.gguf")
    reply = model.create_chat_completion([{"role": "user", "content": "Please introduce yourself."}], max_tokens=48,
                                         temperature=0.0)
    choice = reply["choices"][0]
    assert "Nimbus" in choice["message"]["content"] and choice["finish_reason"] == "stop", choice


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_llama_cpp_as_in_transformers(tiny_model_folder, tmp_path, family):
    """The f32 file's logits equal the merged model's, so llama.cpp reads every hyper-parameter as meant (head_dim,
    soft-capping, Gemma's norms and scaled embeddings, sliding-window layers); q4_k_m's tensor types are
    llama-quantize's."""
    out = make_output_folder(tiny_model_folder(family), tmp_path / "run")
    export(out, merged=True, gguf_types="f32,q4_k_m")
    tokenizer = AutoTokenizer.from_pretrained(default_export_folder(out) / "merged")
    ids = tokenizer.encode(TEXT)
    merged = AutoModelForCausalLM.from_pretrained(default_export_folder(out) / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    model = load(default_export_folder(out) / "run-f32.gguf", context=64)
    assert model.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    got = logits(model, [ids])
    # llama.cpp runs Mistral as Llama, without its sliding window (the README says so): equal inside the window
    positions = SLIDING_WINDOW if family == "mistral" else len(ids)
    np.testing.assert_allclose(got[:positions], expected[:positions], atol=2e-3)  # measured <= 9.3e-4 (Gemmas)

    theirs = llama_quantize(default_export_folder(out) / "run-f32.gguf", tmp_path / "q.gguf", "q4_k_m")
    types = {tensor.name: tensor.tensor_type for tensor in GGUFReader(default_export_folder(out) / "run-q4_k_m.gguf").tensors}
    assert types == {tensor.name: tensor.tensor_type for tensor in GGUFReader(theirs).tensors}
