"""Quick looks at what a base model has learned: greedy continuations of fixed prompts and
unconditional samples, printed during base-train and by base-eval (through the KV-cache engine)."""

from picochat.engine import Engine

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def _continue(model, tokenizer, tokens, max_tokens, temperature, seed=42) -> str:
    """The text sampled after `tokens`, up to a BOS (the start of another document)."""
    [sequence], _ = Engine(model, tokenizer).generate_batch(tokens, 1, max_tokens=max_tokens,
                                                            temperature=temperature, seed=seed)
    return tokenizer.decode(sequence[len(tokens):])


def sample_completions(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16) -> list[tuple[str, str]]:
    """[(prompt, greedy continuation)] for each prompt, on the device of the model's weights."""
    bos = tokenizer.get_bos_token_id()
    return [(p, _continue(model, tokenizer, tokenizer.encode(p, prepend=bos), max_tokens, 0.0)) for p in prompts]


def sample_unconditional(model, tokenizer, num_samples: int = 8, max_tokens: int = 128,
                         temperature: float = 1.0) -> list[str]:
    """Texts sampled from BOS alone, sample i with seed i."""
    bos = tokenizer.get_bos_token_id()
    return [_continue(model, tokenizer, [bos], max_tokens, temperature, seed=i) for i in range(num_samples)]
