"""`ftcli export` on tiny models of every family: the merged folder, GGUF files read back by gguf and
transformers, Modelfiles, the plain adapter copy, and the errors a person can make."""

import json

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import assert_clean_failure, make_output_folder, run_cli
from ftcli.export import default_export_folder, export
from ftcli.export.gguf_file import ARCHITECTURES, gguf_weight
from ftcli.export.modelfile import CHAT_FORMATS
from ftcli.export.source import nf4_round_trip
from ftcli.owned_folders import MARKER_FILE, TRAINING_RUN, write_marker
from tiny_models import FAMILIES

TEXT = "What is one plus two? One plus two is three. Say the number 7."
SHORT_TEXT = "What is one plus two?"  # shorter than the tiny models' sliding window of 16 tokens
# transformers reads the GGUF's whole config for these; for the others it drops head_dim (qwen3), Gemma 2/3's
# query_pre_attn_scalar and Gemma 3's layer pattern, so those load with the merged folder's config
TRANSFORMERS_READS_CONFIG = {"llama", "mistral", "qwen2", "phi3"}
TRANSFORMERS_HAS_NO_GGUF_LOADER = {"gemma"}
# transformers 5.17 rebuilds a Gemma or Phi-3 GGUF's tokenizer as SentencePiece whatever the file holds (5.24 reads the
# tiny models' byte-level BPE); their real checkpoints are SentencePiece, and llama.cpp's own tokenizer is checked on
# every family's file in test_llama_cpp.py
TRANSFORMERS_READS_BPE_VOCAB = {"llama", "mistral", "qwen2", "qwen3"}


def logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)])).logits[0].float()


@pytest.fixture(scope="module")
def exported(tiny_model_folder, tmp_path_factory):
    """Each family's output folder exported once: merged, f32, f16, q8_0 and q4_k_m."""
    done = {}

    def run(family):
        if family not in done:
            out = make_output_folder(tiny_model_folder(family), tmp_path_factory.mktemp(family) / "run")
            summary = export(out, merged=True, gguf_types="f32,f16,q8_0,q4_k_m", check=False)  # test_export_check
            done[family] = (out, summary)
        return done[family]

    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_folder_equals_the_adapter_on_its_base(family, exported, tiny_model_folder):
    out, summary = exported(family)
    merged_folder = default_export_folder(out) / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_folder, dtype=torch.float32)
    assert merged.dtype == torch.float32 and AutoConfig.from_pretrained(merged_folder).dtype == torch.bfloat16
    assert (merged_folder / "generation_config.json").is_file() and (merged_folder / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    expected, got = logits(reference, tokenizer), logits(merged.eval(), tokenizer)
    # the only difference is the bfloat16 rounding of the merged weights (8 bits of mantissa)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    unmerged = logits(AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.float32).eval(),
                      tokenizer)
    assert (unmerged - expected).abs().max() > 5 * (got - expected).abs().max()  # the LoRA really is merged


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_metadata_and_tensors_read_back(family, exported):
    """gguf's reader finds every hyper-parameter, the whole vocabulary and each weight as it was merged."""
    out, summary = exported(family)
    merged_folder = default_export_folder(out) / "merged"
    config = AutoConfig.from_pretrained(merged_folder)
    reader = gguf.GGUFReader(summary["outputs"]["gguf_f32"]["path"])
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[ARCHITECTURES[family][0]]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
                "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
                "attention.head_count": config.num_attention_heads,
                "attention.head_count_kv": config.num_key_value_heads, "attention.key_length": head_dim,
                "attention.value_length": head_dim, "rope.dimension_count": head_dim}
    for key, value in expected.items():
        assert reader.fields[f"{arch}.{key}"].contents() == value, key
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)  # Gemma 3 has one per layer kind
    assert reader.fields[f"{arch}.rope.freq_base"].contents() == pytest.approx(rope["rope_theta"])
    if family == "gemma2":
        assert reader.fields["gemma2.attn_logit_softcapping"].contents() == 50.0
        assert reader.fields["gemma2.final_logit_softcapping"].contents() == 30.0
    if family in ("gemma2", "gemma3_text"):
        assert reader.fields[f"{arch}.attention.sliding_window"].contents() == 16

    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == config.vocab_size and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[100] == gguf.TokenType.NORMAL
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == len(json.loads(
        (merged_folder / "tokenizer.json").read_text())["model"]["merges"])
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.padding_token_id"].contents() == tokenizer.pad_token_id
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template

    merged_state = AutoModelForCausalLM.from_pretrained(merged_folder, dtype=torch.float32).state_dict()
    names = gguf.get_tensor_name_map(ARCHITECTURES[family][0], config.num_hidden_layers)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    checked = 0
    for hf_name, weight in merged_state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = stored.pop(names.get_name(hf_name, try_suffixes=(".weight", ".bias")))
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(reversed(tensor.shape.tolist())) == list(weight.shape), hf_name
        expected_values = gguf_weight(config, hf_name, weight).numpy()
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(expected_values.shape), expected_values)
        checked += 1
    assert not stored and checked > 10


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - TRANSFORMERS_HAS_NO_GGUF_LOADER))
def test_gguf_loads_in_transformers_with_the_merged_logits(family, exported):
    out, summary = exported(family)
    merged_folder = default_export_folder(out) / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder, dtype=torch.float32).eval()
    text = SHORT_TEXT if family == "mistral" else TEXT  # llama.cpp and transformers run Mistral GGUFs as Llama
    expected = logits(merged, tokenizer, text)
    for name, max_error, min_agreement in (("f16", 1e-5, 1.0), ("q8_0", 0.05, 0.85)):
        path = summary["outputs"][f"gguf_{name}"]["path"]
        options = {} if family in TRANSFORMERS_READS_CONFIG else {"config": AutoConfig.from_pretrained(merged_folder)}
        model = AutoModelForCausalLM.from_pretrained(default_export_folder(out), gguf_file=path.rsplit("/", 1)[1],
                                                     dtype=torch.float32, **options).eval()
        got = logits(model, tokenizer, text)
        assert (got - expected).abs().max() <= max_error * expected.abs().max(), name
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= min_agreement, name
        if family in TRANSFORMERS_READS_BPE_VOCAB:
            gguf_tokenizer = AutoTokenizer.from_pretrained(default_export_folder(out), gguf_file=path.rsplit("/", 1)[1])
            assert gguf_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_type_mix_and_sizes(exported):
    """Tiny rows (64 values) are not a multiple of 256, so q4_k_m falls back as llama-quantize does."""
    out, summary = exported("llama")
    outputs = summary["outputs"]
    assert outputs["gguf_f32"]["tensor_types"] == {"F32": 21}
    assert outputs["gguf_f16"]["tensor_types"] == {"F16": 16, "F32": 5}
    assert outputs["gguf_q8_0"]["tensor_types"] == {"Q8_0": 16, "F32": 5}
    # attn_v (Q6_K in the first/last eighth of layers) -> Q8_0, the rest Q4_K -> Q5_0, output Q6_K -> Q8_0
    assert outputs["gguf_q4_k_m"]["tensor_types"] == {"Q8_0": 3, "Q5_0": 13, "F32": 5}
    sizes = [outputs[f"gguf_{name}"]["bytes"] for name in ("f32", "f16", "q8_0", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True)


def test_modelfile_beside_each_gguf(exported):
    out, summary = exported("qwen2")
    for name in ("f16", "q4_k_m"):
        path = summary["outputs"][f"gguf_{name}"]["modelfile"]
        text = open(path).read()
        assert text == f'FROM ./run-{name}.gguf\nTEMPLATE """{CHAT_FORMATS["chatml"].go_template}"""\n' \
                       'PARAMETER stop "<|im_end|>"\n'  # the tiny models' ChatML (tests/test_modelfile.py renders it)


def test_no_flag_copies_the_adapter(tiny_model_folder, tmp_path):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "run")
    result = run_cli("export", out, "--to", tmp_path / "exports")
    assert result.exit_code == 0, result.output
    copy = tmp_path / "exports" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted([MARKER_FILE] + [p.name for p in out.iterdir()])
    assert any("lora_B" in name for name, _ in model.named_parameters())


def test_merge_of_a_4bit_run_uses_the_nf4_base(tiny_model_folder, tmp_path):
    """A QLoRA adapter was trained over NF4 weights: the merged model is that NF4 base plus the LoRA."""
    base = tiny_model_folder("llama")
    out = make_output_folder(base, tmp_path / "run", load_in_4bit=True)
    export(out, merged=True)
    merged = AutoModelForCausalLM.from_pretrained(default_export_folder(out) / "merged", dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
    lora = dict(adapter.named_parameters())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 2.0 * lora[f"{prefix}.lora_B.default.weight"] @ lora[f"{prefix}.lora_A.default.weight"]
    name = "model.layers.0.self_attn.q_proj.weight"
    nf4 = nf4_round_trip(original[name].to(torch.bfloat16)).float()
    assert not torch.equal(nf4, original[name].to(torch.bfloat16).float())
    expected = (nf4 + delta).to(torch.bfloat16).float()
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    # embeddings and norms were never quantized
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               original["model.embed_tokens.weight"].to(torch.bfloat16).float())


def test_errors_name_the_problem(tiny_model_folder, tmp_path):
    result = run_cli("export", tmp_path)
    assert_clean_failure(result, 2, "is not a training output folder")
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "run")
    result = run_cli("export", out, "--gguf", "q4_k_m,q3_k")
    assert_clean_failure(result, 2, "unknown type q3_k", "q4_k_m")
    assert run_cli("export", out, "--gguf", "f16").exit_code == 0
    result = run_cli("export", out, "--gguf", "f16")
    assert_clean_failure(result, 2, "run-f16.gguf already exists. Pass --overwrite")
    assert run_cli("export", out, "--gguf", "f16", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "run-export").iterdir()) == ["check.json", "run-f16.Modelfile",
                                                                         "run-f16.gguf"]


def test_export_refuses_to_replace_a_folder_it_did_not_write_or_to_write_inside_out(tiny_model_folder, tmp_path):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "run")
    mine = tmp_path / "exports" / "merged"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = run_cli("export", out, "--merged", "--gguf", "f16", "--to", tmp_path / "exports", "--overwrite")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"{mine} is a folder ftcli did not write" in result.output and "--to DIR" in result.output
    assert sorted(p.name for p in mine.parent.rglob("*")) == ["merged", "notes.txt"]  # refused before any work

    result = run_cli("export", out, "--to", out / "export")
    assert result.exit_code == 2 and "is inside the training output folder" in result.output
    assert f"beside it ({tmp_path / 'run-export'})" in result.output and not (out / "export").exists()


def test_export_without_out_takes_the_newest_finished_run(tiny_model_folder, tmp_path, monkeypatch):
    """The design's forms: `ftcli export --gguf q4_k_m` (the newest run under ./outputs) and `ftcli export OUT --gguf`."""
    monkeypatch.chdir(tmp_path)
    for name in ("newest", "older"):  # finish order, against the names' order
        write_marker(make_output_folder(tiny_model_folder("llama"), tmp_path / "outputs" / name), TRAINING_RUN)
    result = run_cli("export", "--gguf", "f16")
    assert result.exit_code == 0, result.output
    assert "Using outputs/older, the newest finished training run under ./outputs." in result.output
    written = tmp_path / "outputs" / "older-export" / "older-f16.gguf"
    assert gguf.GGUFReader(written).fields["general.file_type"].contents() == 1  # MOSTLY_F16
    result = run_cli("export", "outputs/newest", "--gguf", "q8_0")
    assert result.exit_code == 0 and "Using" not in result.output, result.output
    assert (tmp_path / "outputs" / "newest-export" / "newest-q8_0.gguf").is_file()


def test_pre_tokenizer_names_follow_the_split_pattern():
    from ftcli.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    def split(pattern):
        return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT),
                                                                                        byte_level]}}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT),
                                                                                        byte_level]}}) == "qwen2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_export_of_a_real_training_run(tiny_model_folder, tmp_path):
    """The folder `ftcli train` writes (recipe.yaml from the recipe schema) exports end to end from the CLI, and a
    second training run into the same folder keeps the exports."""
    from conftest import write_jsonl, write_recipe

    rows = [{"messages": [{"role": "user", "content": "Say the number 7."},
                          {"role": "assistant", "content": "The number is 7."}]}] * 4
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_folder("qwen2"), data, out)
    assert run_cli("train", recipe, "--json").exit_code == 0
    result = run_cli("export", out, "--merged", "--gguf", "q8_0", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["source"]["adapted_weights"] == 14
    assert gguf.GGUFReader(summary["outputs"]["gguf_q8_0"]["path"]).fields["general.file_type"].contents() == 7
    assert AutoModelForCausalLM.from_pretrained(summary["outputs"]["merged"]["path"]).config.model_type == "qwen2"
    # the exports sit beside OUT, so training into OUT again (output.overwrite) leaves them alone
    assert run_cli("train", recipe, "--set", "output.overwrite=true", "--json").exit_code == 0
    assert gguf.GGUFReader(summary["outputs"]["gguf_q8_0"]["path"]).fields["general.file_type"].contents() == 7


def test_llama3_rope_factors_match_transformers_scaled_frequencies():
    """Llama 3.1's rope scaling travels as rope_freqs: the divisors that turn plain frequencies into scaled ones."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ftcli.export.gguf_file import _extra_tensors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    [(name, factors)] = _extra_tensors(config)
    assert name == "rope_freqs.weight" and factors.shape == (64,)
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)


def test_sentencepiece_style_vocab_round_trips(tmp_path):
    """Llama 2, Mistral and Gemma tokenizers (BPE with byte fallback) become llama.cpp's "llama" model: byte tokens
    typed BYTE, pieces scored by merge order, so transformers' GGUF tokenizer rebuilds the same merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from ftcli.export.gguf_file import add_hyperparameters
    from ftcli.export.vocab import add_vocab

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "n"), ("▁", "w"), ("o", "r"), ("l", "d"), ("▁", "n")]
    for piece in ["▁", "t", "h", "e", "a", "n", "o", "w", "r", "l", "d", "i", "s", "7"] + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    writer = gguf.GGUFWriter(None, "llama")
    add_hyperparameters(writer, config, gguf.LlamaFileType.ALL_F32, "spm")
    add_vocab(writer, tmp_path, len(vocab))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for name, weight in AutoModelForCausalLM.from_config(config).state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), weight.float().numpy())
    writer.write_header_to_file(tmp_path / "m.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] and types[259] == gguf.TokenType.NORMAL
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the world is 7 ñ", "hello there", "new world"]:
        assert rebuilt.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
