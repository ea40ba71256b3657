"""Server defaults, importable without the web stack (the CLI's ``--help`` must stay fast)."""

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a long prompt as text or token ids, not a flood
DEFAULT_MAX_QUEUE = 1024  # waiting sequences before 429
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_RETRY_AFTER_S = 1  # Retry-After on 429
# Prompts (strings or token-id lists) in one completions request. OpenAI's
# legacy endpoint took lists; servers that bound them pick a few hundred or less.
DEFAULT_MAX_PROMPTS_PER_REQUEST = 128
# --max-prompt-chars defaults to the context length times this: real text
# averages 3-5 characters per token, so a longer prompt cannot fit.
DEFAULT_CHARS_PER_TOKEN = 32
DEFAULT_CHAT_TEMPLATE_TIMEOUT_S = 2.0  # real templates render in milliseconds
DEFAULT_PREPROCESS_THREADS = 4  # threads that render templates and tokenize
