"""The tokenizer as GGUF metadata: tokens, scores, token types, merges, special ids and the chat template.

Two tokenizer models cover the supported families, as in llama.cpp's converter: byte-level BPE ("gpt2": Llama 3,
Qwen, SmolLM, Phi-3.5+) and SentencePiece-style BPE with byte fallback ("llama": Llama 2, Mistral, Gemma).
gguf's SpecialVocab reads merges, special ids, add-bos/eos flags and the chat template from the folder.
"""

import json
from pathlib import Path

import gguf

from ftcli.errors import FtcliError

# pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre), recognised by their splitting pattern
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, trust_remote_code: bool = False) -> None:
    """Write the tokenizer of the Hugging Face folder `folder`, padded to the model's `vocab_size` rows."""
    from transformers import AutoTokenizer

    tokenizer_json_path = folder / "tokenizer.json"
    if not tokenizer_json_path.is_file():
        raise FtcliError(f"{folder} has no tokenizer.json (a fast tokenizer), which GGUF export reads. Save the "
                         "tokenizer with a recent transformers so that tokenizer.json is written.")
    tokenizer_json = json.loads(tokenizer_json_path.read_text())
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise FtcliError(f"{tokenizer_json_path} holds a {model.get('type')} tokenizer; GGUF export supports BPE "
                         "tokenizers (byte-level, or SentencePiece-style with byte fallback).")
    sentencepiece_style = bool(model.get("byte_fallback"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)

    tokens, scores, types = token_table(tokenizer, vocab_size, sentencepiece_style)
    writer.add_tokenizer_model("llama" if sentencepiece_style else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece_style else pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if sentencepiece_style:
        writer.add_add_space_prefix(_prepends_space(tokenizer_json))
    special = gguf.SpecialVocab(folder, load_merges=not sentencepiece_style, n_vocab=len(tokens))
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    if "pad" not in special.special_token_ids and tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)


def adds_bos_token(folder: Path) -> bool:
    """Whether llama.cpp puts the BOS token before a prompt itself: the tokenizer.ggml.add_bos_token that
    add_vocab writes for this tokenizer folder."""
    return bool(gguf.SpecialVocab(folder, load_merges=False).add_special_token.get("bos"))


def token_table(tokenizer, vocab_size: int, sentencepiece_style: bool):
    """Every id's text, score and type: added special tokens are CONTROL, other added ones USER_DEFINED,
    ids past the tokenizer (embedding rows kept for padding) UNUSED placeholders.

    SentencePiece-style BPE merges by score, so a normal piece's score is minus its id: the vocabulary is
    stored in merge order, earlier merges first.
    """
    by_id = {index: text for text, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for index in range(max(vocab_size, len(by_id))):
        text = by_id.get(index)
        if text is None:
            tokens.append(f"[PAD{index}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if index in added:
            scores.append(0.0 if sentencepiece_style else -1000.0)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece_style and text.startswith("<0x") and len(text) == 6 and text.endswith(">"):
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(index) if sentencepiece_style else 0.0)
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way a byte-level BPE splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    patterns = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    if LLAMA3_SPLIT in patterns:
        return "llama-bpe"
    if QWEN2_SPLIT in patterns:
        return "qwen2"
    kinds = [step.get("type") for step in steps]
    if "Digits" in kinds and "ByteLevel" in kinds:
        return "smollm"  # SmolLM and StarCoder: digits one by one, then GPT-2's byte-level split
    return "gpt-2" if kinds == ["ByteLevel"] else "default"


def _prepends_space(tokenizer_json: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts '▁' before the text (Llama 2, Mistral; not Gemma)."""
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return '"prepend": "\\u2581"' in text or '"add_prefix_space": true' in text or '"prepend_scheme": "always"' in text
