"""Without a Hub to reach, evaluation datasets and model downloads say so at once (vlmbatch.hub).

huggingface_hub retries a request that cannot connect five times with growing sleeps; these run the
real command in a fresh process against a local endpoint that counts the connections made to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from factory import real_photos

RETRY_LOOP_S = 15  # the retries alone took 23 s; a refusal comes well before


@pytest.fixture()
def silent_hub():
    """An endpoint that accepts each connection and hangs up at once; yields (url, connection count)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    connections, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    server.close()


def vlmbatch(tmp_path, *args, **env):
    """`python -m vlmbatch ARGS` with its own empty Hugging Face cache; (rc, stderr lines, seconds)."""
    environ = {k: v for k, v in os.environ.items()
               if not k.upper().endswith("_PROXY") and k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "vlmbatch", *map(str, args)], capture_output=True, text=True,
                         env=environ, cwd=tmp_path, timeout=120)
    return run.returncode, run.stderr.strip().splitlines(), time.monotonic() - start


def test_eval_asks_a_hub_that_does_not_answer_once(tmp_path, silent_hub):
    endpoint, connections = silent_hub
    rc, lines, seconds = vlmbatch(tmp_path, "eval", "--dataset", "coco", HF_ENDPOINT=endpoint)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot reach the Hugging Face Hub to load yerevann/coco-karpathy (the Hub at "
                               f"{endpoint} did not answer: ")
    assert "HF_HUB_OFFLINE=1 reads a copy in the Hugging Face cache" in lines[0] and "--data" in lines[0]
    assert len(connections) == 1 and seconds < RETRY_LOOP_S


def test_eval_with_hf_hub_offline_asks_no_hub(tmp_path, silent_hub):
    endpoint, connections = silent_hub
    rc, lines, _ = vlmbatch(tmp_path, "eval", "--dataset", "coco", HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub to load yerevann/coco-karpathy")
    assert connections == []


def test_an_unresolvable_hub_host_fails_fast(tmp_path):
    rc, lines, seconds = vlmbatch(tmp_path, "eval", "--dataset", "coco", HF_ENDPOINT="http://hub.invalid")
    assert rc == 2 and len(lines) == 1, lines
    assert "the Hub at http://hub.invalid did not answer" in lines[0] and seconds < RETRY_LOOP_S


def test_a_model_download_asks_a_silent_hub_once_then_looks_in_the_cache(tmp_path, silent_hub):
    endpoint, connections = silent_hub
    (tmp_path / "images").mkdir()
    next(iter(real_photos().values())).convert("RGB").save(tmp_path / "images" / "a.jpg")
    rc, lines, seconds = vlmbatch(tmp_path, "caption", "images", "--out", "o.parquet", "--model", "owner/model",
                                  HF_ENDPOINT=endpoint)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot download owner/model: the Hub at {endpoint} did not answer: ")
    assert lines[0].endswith("and not in the Hugging Face cache; pass a local checkpoint directory with --model")
    assert len(connections) == 1 and seconds < RETRY_LOOP_S
