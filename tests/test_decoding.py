"""ftcli's decode loop against transformers' generate, its sampling, stop tokens and streamed text."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftcli.data.templates import BUILTIN_TEMPLATES, end_of_turn_ids, generation_prompt_ids
from ftcli.decoding import Decoder, Sampling, TextStream, has_sliding_window_layers, pick_token, pick_tokens
from tiny_models import build_tiny_tokenizer

GREEDY = Sampling(max_new_tokens=24, temperature=0.0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load(folder, dtype=torch.float32, device="cpu"):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # run generate to max_new_tokens, as the decoder does without stops
    return model


def generate_reference(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids], device=model.device), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


# Mistral, Gemma 2 and Gemma 3 have sliding windows of 16 tokens here, shorter than prompt + answer, so the static
# cache's rolling sliding-window layers run; Gemma 2 also soft-caps attention and logits.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "phi3"])
def test_greedy_decoding_equals_generate_token_for_token(tiny_model_folder, family):
    model = load(tiny_model_folder(family))
    prompt = build_tiny_tokenizer().encode("What is one plus two? Say the number 7.")
    ours = list(Decoder(model, 256, compile=False).generate(prompt, GREEDY))
    assert ours == generate_reference(model, prompt, GREEDY.max_new_tokens)


def test_greedy_answer_of_the_fixture_equals_generate_and_stops_at_end_of_turn(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = load(smollm2_folder)
    prompt = generation_prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    decoder = Decoder(model, 2048, compile=False)
    stops = end_of_turn_ids(tokenizer, model.generation_config)
    ours = list(decoder.generate(prompt, Sampling(max_new_tokens=40, temperature=0.0), stops))
    reference = generate_reference(model, prompt, 40)
    assert tokenizer.decode(ours) == "The capital of France is Paris."
    assert reference[:len(ours) + 1] == ours + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_only_models_without_sliding_windows_get_the_compiled_step(tiny_model_folder):
    from transformers import AutoConfig

    sliding = {family: has_sliding_window_layers(AutoConfig.from_pretrained(tiny_model_folder(family)))
               for family in ("llama", "qwen3", "phi3", "mistral", "gemma2", "gemma3_text")}
    assert sliding == {"llama": False, "qwen3": False, "phi3": False, "mistral": True, "gemma2": True,
                       "gemma3_text": True}


def test_decoder_is_reusable_and_grows_its_cache(tiny_model_folder):
    model = load(tiny_model_folder("llama"))
    decoder = Decoder(model, 1024, compile=False)
    short, long = [5, 6, 7], list(range(3, 200)) * 2  # the second needs a bigger cache than the first made
    first = list(decoder.generate(short, GREEDY))
    list(decoder.generate(long, GREEDY))
    assert decoder.cache_size == 512
    assert list(decoder.generate(short, GREEDY)) == first == generate_reference(model, short, GREEDY.max_new_tokens)


def test_an_interrupted_answer_leaves_the_decoder_ready(tiny_model_folder):
    model = load(tiny_model_folder("qwen2"))
    decoder = Decoder(model, 256, compile=False)
    prompt = [10, 11, 12, 13]
    for _ in zip(range(5), decoder.generate([20, 21, 22], GREEDY)):
        pass  # stopped after five tokens, as Ctrl-C stops an answer
    assert list(decoder.generate(prompt, GREEDY)) == generate_reference(model, prompt, GREEDY.max_new_tokens)


def test_answers_stop_before_a_stop_token_and_at_the_context_length(tiny_model_folder):
    model = load(tiny_model_folder("llama"))
    prompt = [5, 6, 7, 8]
    full = list(Decoder(model, 256, compile=False).generate(prompt, GREEDY))
    stop = full[6]
    stopped = list(Decoder(model, 256, compile=False).generate(prompt, GREEDY, {stop}))
    assert stopped == full[:full.index(stop)]
    assert list(Decoder(model, len(prompt) + 3, compile=False).generate(prompt, GREEDY)) == full[:3]
    assert list(Decoder(model, len(prompt), compile=False).generate(prompt, GREEDY)) == []


def test_sampling_repeats_with_a_seed_and_varies_without(tiny_model_folder):
    model = load(tiny_model_folder("llama"))
    hot = Sampling(max_new_tokens=30, temperature=1.0, top_p=1.0)
    runs = [list(Decoder(model, 256, compile=False, seed=seed).generate([5, 6, 7], hot)) for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] != list(Decoder(model, 256, compile=False).generate([5, 6, 7], GREEDY))[:30]


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {pick_token(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(300)}
    assert drawn == {1, 3}  # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 are cut
    assert {pick_token(logits, Sampling(temperature=1.0, top_p=1.0), generator) for _ in range(300)} == {0, 1, 2, 3}
    assert {pick_token(logits, Sampling(temperature=1.0, top_p=0.0), generator) for _ in range(50)} == {1}
    assert pick_token(logits, Sampling(temperature=0.0), generator) == 1


def test_each_row_of_a_batch_is_cut_at_its_own_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.05, 0.35, 0.2]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([pick_tokens(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(300)])
    assert [set(draws[:, row].tolist()) for row in range(2)] == [{1, 3}, {0, 2}]
    assert pick_tokens(logits, Sampling(temperature=0.0), generator).tolist() == [1, 0]


def test_streamed_text_keeps_multibyte_characters_whole():
    tokenizer = build_tiny_tokenizer()
    text = "Héllo wörld 🙂, 数字 7 — done."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary splits the multi-byte characters into several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == stream.text() == text
    assert pieces.count("") > 0  # some tokens were held back until their character was complete
    assert stream.rest() == ""
    cut = TextStream(tokenizer)
    shown = "".join(cut.push(token) for token in tokenizer.encode("ok 🙂")[:-1])  # stopped inside the emoji
    assert shown == "ok " and shown + cut.rest() == cut.text() == tokenizer.decode(tokenizer.encode("ok 🙂")[:-1])


def test_end_of_turn_ids_come_from_the_template(smollm2_folder):
    fixture = AutoTokenizer.from_pretrained(smollm2_folder)
    assert end_of_turn_ids(fixture) == {fixture.convert_tokens_to_ids("<|im_end|>")}
    tiny = build_tiny_tokenizer()
    tiny.eos_token = "<|endoftext|>"  # the template's end of turn is then found only by rendering
    assert end_of_turn_ids(tiny) == {0, 2}
    tiny.chat_template = BUILTIN_TEMPLATES["alpaca"]  # ends an answer with the EOS token and no marker of its own
    assert end_of_turn_ids(tiny) == {0}


def test_generation_prompt_ids_end_where_the_answer_begins(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = generation_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                     "<|im_start|>assistant\n")


@cuda
@pytest.mark.parametrize("precision", ["float32", "nf4", "nf4 + adapter"])
def test_compiled_step_on_cuda_equals_eager_and_never_recompiles(tiny_model_folder, precision):
    """The CUDA-graph step gives the eager loop's greedy tokens, and a second answer (another prompt length,
    same cache) replays the graph without compiling again. "nf4 + adapter" is how `ftcli chat` runs an adapter
    trained in 4 bits: peft's LoRA layers beside the NF4 weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    options = {"dtype": torch.float32, "device_map": {"": "cuda"}}
    if precision.startswith("nf4"):
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), **options).eval()
    if precision.endswith("adapter"):
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    first, second = [5, 6, 7, 8], list(range(20, 60))
    eager = Decoder(model, 256, compile=False)
    compiled = Decoder(model, 256, compile=True)
    assert compiled.compiled
    assert list(compiled.generate(first, GREEDY)) == list(eager.generate(first, GREEDY))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert list(compiled.generate(second, GREEDY)) == list(eager.generate(second, GREEDY))


@cuda
def test_sampling_on_cuda_repeats_with_a_seed_and_a_grown_cache_stays_right(tiny_model_folder):
    model = load(tiny_model_folder("llama"), device="cuda")
    hot = Sampling(max_new_tokens=30, temperature=1.0, top_p=0.9)
    runs = [list(Decoder(model, 4096, compile=True, seed=3).generate([5, 6, 7], hot)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30
    compiled, eager = Decoder(model, 4096, compile=True), Decoder(model, 4096, compile=False)
    for prompt in ([5, 6], list(range(3, 200)) * 2):  # the second grows the cache: a new graph for the new size
        assert list(compiled.generate(prompt, GREEDY)) == list(eager.generate(prompt, GREEDY))
    assert compiled.cache_size == 512


@cuda
def test_sliding_window_models_decode_eagerly_on_cuda(tiny_model_folder):
    model = load(tiny_model_folder("mistral"), device="cuda")
    decoder = Decoder(model, 256, compile=True)
    assert not decoder.compiled
    prompt = [5, 6, 7, 8, 9, 10]
    assert list(decoder.generate(prompt, GREEDY)) == generate_reference(model, prompt, GREEDY.max_new_tokens)
