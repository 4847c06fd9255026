"""A random-weight ~125M-parameter Llama checkpoint for CPU benchmarks (issue 5), with a tokenizer.

Writes a Hugging Face model directory (default ``$KILN_CACHE/llama125m``, ``KILN_CACHE``
defaulting to ``~/.cache/kiln``; never inside the repository) holding:

* ``config.json`` + ``model.safetensors``: ``LlamaForCausalLM`` with hidden 768, 12 layers,
  12 query heads / 4 KV heads (head_dim 64), intermediate 2048, vocabulary 32000, untied
  embeddings, RoPE theta 10000, 2048 positions, f32, weights from transformers' own
  initialisation after ``torch.manual_seed(SEED)`` (saved with ``save_pretrained``);
* ``generation_config.json`` (bos 1, eos 2);
* ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``): a Llama-2-style
  byte-fallback BPE with exactly 32000 ids: ``<unk>``=0, ``<s>``=1 (prepended to every
  encoding), ``</s>``=2, the 256 byte tokens ``<0x00>``..``<0xFF>`` at 3..258 and 31741 tokens
  learned by ``tokenizers``' BpeTrainer on a synthetic corpus (words made of random syllables
  with a Zipf-like frequency, from a seeded generator), with the Metaspace ("▁") pre-tokenizer
  and the byte-fallback decoder that transformers' LlamaConverter writes. This shape is what
  llama.cpp's ``convert_hf_to_gguf.py`` recognises as a Llama (SentencePiece-style) vocabulary,
  so the same directory converts to GGUF, and what ``kiln generate`` reads.

The weights are random: the checkpoint is for throughput only, its text is gibberish.
Seeded (corpus and weights; torch on one thread), so meant to be reproducible
for a given torch/transformers/tokenizers build; a second run was not compared byte-for-byte.

    /work/ref-venv/bin/python scripts/reference/make_llama125m.py [--out DIR]

Prints the directory. Needs torch, transformers and tokenizers.
"""

import argparse
import json
import os
import random

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SEED = 0
VOCAB = 32000
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# The corpus: CORPUS_WORDS words drawn (Zipf-like) from DISTINCT_WORDS random words.
DISTINCT_WORDS, CORPUS_WORDS, WORDS_PER_LINE = 60000, 600000, 12
CHECK_TEXTS = [
    "Hello world, this is kiln.",
    "spaces  in   between,\ttabs\nand new lines",
    "Unicode: café, naïve, Ελληνικά, 中文, emoji 🙂.",
    "3.14159 + 2 = 5.14159?",
]


def llama125m_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2048,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def synthetic_corpus(rng):
    """Lines of words built from random syllables; frequencies fall off as 1/rank."""
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl", "gr", "br", ""]
    vowels = list("aeiouy") + ["ai", "ea", "ou", "io"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "x"]
    words = set()
    while len(words) < DISTINCT_WORDS:
        n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n))
        if rng.random() < 0.1:
            w = w.capitalize()
        if rng.random() < 0.03:
            w += str(rng.randrange(1000))
        words.add(w)
    words = sorted(words)
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    drawn = rng.choices(words, weights=weights, k=CORPUS_WORDS)
    punct = [".", ",", "!", "?", ";", ":"]
    lines = []
    for i in range(0, len(drawn), WORDS_PER_LINE):
        line = " ".join(drawn[i : i + WORDS_PER_LINE])
        lines.append(line + rng.choice(punct))
    return lines


def make_tokenizer():
    """Llama-2-style byte-fallback BPE with exactly VOCAB ids (see the module doc)."""
    rng = random.Random(SEED)
    learned = VOCAB - len(BYTE_TOKENS)  # the specials count in the trainer's vocab_size
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=learned, special_tokens=SPECIALS, show_progress=False
    )
    trainer_tok.train_from_iterator(synthetic_corpus(rng), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    by_id = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    if len(by_id) != learned:
        raise SystemExit(f"BPE trainer learned {len(by_id)} tokens, wanted {learned}")
    vocab = {}
    for t in SPECIALS + BYTE_TOKENS:
        vocab[t] = len(vocab)
    for t, _ in by_id:
        if t in vocab:
            if t not in SPECIALS:
                raise SystemExit(f"learned token {t!r} collides with a byte token")
            continue
        vocab[t] = len(vocab)
    assert len(vocab) == VOCAB, len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok, d):
    tok.save_pretrained(d)
    stm = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2, sort_keys=True)
        f.write("\n")
    loaded = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    if raw.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer.json has {raw.get_vocab_size()} ids, wanted {VOCAB}")
    for text in CHECK_TEXTS:
        a = loaded(text)["input_ids"]
        b = raw.encode(text).ids
        if a != b:
            raise SystemExit(f"AutoTokenizer and tokenizer.json disagree on {text!r}: {a} vs {b}")
        if a[0] != 1 or max(a) >= VOCAB:
            raise SystemExit(f"bad encoding of {text!r}: {a}")
        if raw.decode(b, skip_special_tokens=True) != text:
            raise SystemExit(f"{text!r} does not round-trip: {raw.decode(b, skip_special_tokens=True)!r}")


def main():
    cache = os.environ.get("KILN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kiln"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(cache, "llama125m"))
    args = p.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    os.makedirs(args.out, exist_ok=True)
    save_tokenizer(make_tokenizer(), args.out)

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama125m_config()).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(args.out, "kiln_generated_by.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "script": "scripts/reference/make_llama125m.py",
                "seed": SEED,
                "parameters": n_params,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(args.out)


if __name__ == "__main__":
    main()
