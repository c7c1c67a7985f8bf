"""One client for OpenAI-compatible chat endpoints (a local vLLM server or a hosted API).

Used by the LLM judge and by the knowledge-acquisition QA writer. Retries with backoff are the
`openai` client's own (429, 5xx, connection errors); requests are spaced to the configured rate. The
API key is read from the environment variable the config names and is never written anywhere.
"""

from __future__ import annotations

import os
import time

from sdft_cli.config import EndpointConfig
from sdft_cli.errors import SdftError


class EndpointError(SdftError):
    """The endpoint failed after its retries."""


class Endpoint:
    def __init__(self, cfg: EndpointConfig, what: str = "endpoint"):
        from openai import OpenAI

        self.cfg, self.what = cfg, what
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        # a local vLLM server accepts any key; a hosted API without one fails at the first request
        self.client = OpenAI(
            base_url=cfg.base_url, api_key=key or "EMPTY", max_retries=cfg.max_retries, timeout=cfg.timeout
        )
        self._last = 0.0
        self.requests = 0

    def _wait(self) -> None:
        if self.cfg.requests_per_second:
            gap = 1.0 / self.cfg.requests_per_second - (time.monotonic() - self._last)
            if gap > 0:
                time.sleep(gap)
        self._last = time.monotonic()

    def complete(self, messages: list[dict]) -> str:
        """The reply text to one chat request."""
        extra: dict = {} if self.cfg.temperature is None else {"temperature": self.cfg.temperature}
        if self.cfg.max_tokens is not None:
            extra["max_tokens"] = self.cfg.max_tokens
        self._wait()
        self.requests += 1
        try:
            out = self.client.chat.completions.create(model=self.cfg.model, messages=messages, **extra)
        except Exception as e:  # the client already retried what is retryable
            raise EndpointError(
                f"{self.what} {self.cfg.base_url} ({self.cfg.model}): {type(e).__name__}: {e}"
            ) from None
        return out.choices[0].message.content or ""
