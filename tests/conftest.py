import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` means fp32 in every process a test starts, as `fp32_unless_asked` makes it in this one
os.environ.setdefault("PEFTKIT_AUTO_PRECISION", "fp32")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from support import chat_rows, save_tiny_bert, save_tiny_llama, sentiment_rows, write_csv, write_jsonl  # noqa: E402

# Tiny models run fastest on one thread, and CI machines are small and shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows())


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows())


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A private peftkit cache, and one torch thread: tiny models only lose to thread hand-offs."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "peftkit-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fp32_unless_asked(monkeypatch: pytest.MonkeyPatch):
    """``--precision auto`` means fp32 in tests on any machine (a CPU with AMX would pick bf16), so that
    results compare across machines; tests of bf16 ask for it."""
    monkeypatch.setattr("peftkit.train.precision.native_bf16", lambda device: False)
