"""Shared helpers of the datagen tests: config composition, the tiny HF model, file digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from longpo_megatron.datagen.config import (
    DatagenConfig,
    register_datagen_configs,
    to_datagen_config,
)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "datagen"
CORPUS = ROOT / "data" / "corpus"
SHARD0 = "shard-00000-of-00001"

SMALL = [
    "progress=false",
    "chunking.min_tokens=150",
    "chunking.max_tokens=300",
    "records.tokenizer=byte",
]
"""Scripted-backend runs: whitespace-token chunks of 150-300 words, byte tokenizer lengths."""


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one CPU thread: the tiny model's ops are so small that a second thread only adds
    synchronisation, and on a busy 2-core machine two threads made generation ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compose_cfg(overrides: list[str]) -> DatagenConfig:
    """Compose conf/datagen/datagen.yaml with Hydra overrides into a typed config."""
    register_datagen_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_datagen_config(compose("datagen", overrides=overrides))


def scripted_cfg(out: Path, *extra: str) -> DatagenConfig:
    """A config for the scripted backend writing under ``out``."""
    return compose_cfg(["backend.model=scripted", f"output_dir={out}", *SMALL, *extra])


def corpus_texts() -> list[str]:
    """Plain text of the bundled corpus (for training the tiny tokenizer)."""
    texts = []
    for path in sorted(CORPUS.iterdir()):
        if path.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in path.read_text().splitlines()]
        elif path.suffix in (".txt", ".md", ".tex"):
            texts.append(path.read_text())
    return texts


def small_corpus(folder: Path, chars: int = 3000) -> Path:
    """Two ~1,500-token documents (whole paragraphs of two bundled essays) as JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small.jsonl"
    lines = []
    for name in ("lantern_service.txt", "seed_library.md"):
        text = ""
        for para in (CORPUS / name).read_text().split("\n\n"):
            if len(text) >= chars:
                break
            text += para + "\n\n"
        lines.append(json.dumps({"id": Path(name).stem, "text": text, "source": name}))
    path.write_text("\n".join(lines) + "\n")
    return path


def digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
