"""Server defaults, importable without the web stack (the CLI's ``--help`` must stay fast)."""

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a long prompt as text or token ids, not a flood
DEFAULT_MAX_QUEUE = 1024  # waiting sequences before 429
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_RETRY_AFTER_S = 1  # Retry-After on 429
