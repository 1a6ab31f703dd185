"""A tiny random-weight Llama with a locally trained BPE tokenizer: real model code, no download."""

from __future__ import annotations

import random
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"  # ends an assistant turn, so it is the chat model's eos (as in Llama 3)
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT, PAD]
VOCAB_SIZE = 1024

# Llama-3 style: BOS, then each turn as header + content + <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_WORDS = (  # split at use: a list literal of 130 words would be harder to read
    "the a an this that some every each one two three many few small large quick slow red blue "
    "green old new good bad early late bright dark cold warm river stone tree city house road "
    "cat dog bird fish horse model batch queue worker token prompt result file request answer "
    "question server engine memory number letter story morning evening window garden market "
    "teacher student doctor farmer writer runs walks sees finds makes takes gives reads writes "
    "builds sends waits holds keeps opens closes asks tells learns moves sleeps sings and or but "
    "so because while when where after before under over near with without from into about "
    "quickly slowly often never always again soon here there today tomorrow yesterday is was "
    "are were has had will can could should would may might I you he she it we they what why how"
)


def _corpus(seed: int, sentences: int = 4000) -> list[str]:
    """English-ish sentences from a fixed word list, reproducible from the seed."""
    rng = random.Random(seed)
    vocab = _WORDS.split()
    lines = []
    for _ in range(sentences):
        words = [rng.choice(vocab) for _ in range(rng.randint(4, 14))]
        end = rng.choice([".", ".", "?", "!"])
        number = f" {rng.randint(0, 999)}" if rng.random() < 0.2 else ""
        lines.append(" ".join(words).capitalize() + number + end)
    return lines


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Llama (random weights) and its tokenizer to out_dir; return out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Byte-level BPE, as Llama 3 uses: any text encodes, nothing maps to <unk>.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    # Special tokens are added first, so they always have ids (0..5).
    ids = {t: i for t in SPECIAL_TOKENS if (i := bpe.token_to_id(t)) is not None}
    bos_id, eot_id, eos_id, pad_id = ids[BOS], ids[EOT], ids[EOS], ids[PAD]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    # transformers leaves this constructor unannotated.
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    tokenizer.save_pretrained(str(out_dir))

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        # head_dim 64: vLLM's CPU attention rejects smaller heads (16 was the old size);
        # two query heads sharing one KV head keep the model at about 2 MB.
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_id=[eot_id, eos_id],
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so greedy decoding wanders instead of repeating one token,
        # which makes batching and stop-string behaviour observable in tests.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [eot_id, eos_id]
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(str(out_dir))
    return out_dir
