"""How each benchmark is run when only a model is given: its default data and split, and the prompt and
decoding of big_vision's PaliGemma transfer configs (big_vision/configs/proj/paligemma/transfers/), so
that a figure can be set beside a published one. Explicit flags override each setting; the report says
which were used. VQAv2's test-dev and test-std have no public answers: they make a results JSON for the
evaluation server instead of scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmbatch.evaluation.benchmarks import DEFAULT_HUB_DATASETS, DEFAULT_SPLITS


@dataclass(frozen=True)
class Protocol:
    """A benchmark's defaults. `split_note` says what the default split is; `origin` where the
    generation settings come from."""

    prompt: str
    num_beams: int
    max_new_tokens: int
    split_note: str
    origin: str

    def generation_note(self, prompt: str, num_beams: int, max_new_tokens: int) -> str:
        """One line for the report: the settings used, and whether they are the protocol's."""
        decoding = "greedy" if num_beams == 1 else f"beam search ({num_beams} beams)"
        used = f"prompt {prompt!r}, {decoding}, at most {max_new_tokens} new tokens"
        same = (prompt, num_beams, max_new_tokens) == (self.prompt, self.num_beams, self.max_new_tokens)
        return f"{used} ({'as in ' if same else 'changed from '}{self.origin})"


_COCOCAP = "big_vision cococap.py: beam_size=2, max_decode_len=32"
PROTOCOLS = {
    "coco": Protocol("caption en", 2, 32, "Karpathy test split, 5,000 images (big_vision's README reports "
                     "Karpathy val: --split validation)", _COCOCAP),
    # big_vision has no Flickr30K transfer config: the COCO captions one is the nearest.
    "flickr30k": Protocol("caption en", 2, 32, "Karpathy test split, 1,000 images", _COCOCAP),
    "vqav2": Protocol("answer en {question}", 1, 32, "val2014, 214,354 questions (big_vision's minival is its "
                      "last 10,240; published figures are test-dev/test-std, from the server)",
                      "big_vision vqav2.py: greedy decode, max_decode_len=32"),
}

# VQAv2 splits without public answers, as typed -> their Hub split names (lmms-lab/VQAv2) and the name
# the evaluation server expects in the results file's name.
SERVER_SPLITS = {"test-dev": "testdev", "testdev": "testdev", "test-std": "test", "test": "test"}
SERVER_FILE_SPLITS = {"testdev": "test-dev2015", "test": "test2015"}


def default_data(dataset: str) -> str:
    """What `--help` and the README say a benchmark reads when --data is not given."""
    return f"{DEFAULT_HUB_DATASETS[dataset]} split {DEFAULT_SPLITS[dataset]!r}: {PROTOCOLS[dataset].split_note}"


def server_results_name(hub_split: str) -> str:
    """The file name the VQA evaluation server expects (vqa_OpenEnded_mscoco_<split>_<method>_results.json)."""
    return f"vqa_OpenEnded_mscoco_{SERVER_FILE_SPLITS[hub_split]}_vlmbatch_results.json"
