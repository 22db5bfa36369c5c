"""A tiny random Llama checkpoint with a full-size vocabulary, built locally (no hub download), for
end-to-end runs of serving engines (the vLLM plugin's test and benchmark).

    path = build_tiny_llama("/tmp/tiny-llama-128k", vocab_size=128256)

The model: ``transformers.LlamaConfig`` (2 layers, hidden 128, two heads of 64: the head size vLLM's CPU attention supports) with random weights, saved with
``save_pretrained`` in float32. The LM head is re-drawn with a larger spread than the default
initialisation so the next-token distributions are peaked like a trained model's (top token
probability ~0.05-0.5 at T=0.7) instead of almost uniform. The tokenizer: a word-level tokenizer
trained with the ``tokenizers`` package on a corpus of ``vocab_size - 3`` distinct words plus
three special tokens, so every model id decodes, saved as a Hugging Face fast tokenizer.
"""

from __future__ import annotations

import json
import os


def build_tiny_llama(
    path: str,
    vocab_size: int = 128256,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    head_scale: float = 0.6,
    seed: int = 0,
) -> str:
    """Write the checkpoint to ``path`` (reused when a complete one is already there); returns path."""
    marker = os.path.join(path, "decodekit_tiny.json")
    spec = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "head_scale": head_scale,
        "seed": seed,
        "version": 1,
    }
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return path
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    os.makedirs(path, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=specials, show_progress=False
    )
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    tok.train_from_iterator((" ".join(words[i : i + 4096]) for i in range(0, len(words), 4096)), trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    hf_tok.save_pretrained(path)

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_scale)
    model.save_pretrained(path, safe_serialization=True)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return path
