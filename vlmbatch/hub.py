"""Whether the Hugging Face Hub can be asked at all, found out with one short request.

huggingface_hub retries a request that cannot connect five times, sleeping longer before each try, so a
run without a network (or with a mistyped HF_ENDPOINT) waited through every retry before its message.
Model downloads, evaluation datasets and Hub sources ask this first, and give their message at once.
"""

from __future__ import annotations

PROBE_TIMEOUT_S = 5.0


def why_unreachable() -> str | None:
    """Why the Hub cannot be reached, or None when it answers (any HTTP status counts as an answer).
    With HF_HUB_OFFLINE set no request is made and None is returned: the libraries then read their
    caches only, without asking the Hub, and say so when a file is not there."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        # huggingface_hub's own client, for the same proxies and certificates; one try, no backoff
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # whatever its transport raises, no answer came: that is what is asked
        return f"the Hub at {constants.ENDPOINT} did not answer: {' '.join(str(exc).split()) or type(exc).__name__}"
    return None
