import logging
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from tests.models import save_tiny_model

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory):
    """SmolLM2's shape in small: Llama with the output head tied to the embedding table."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_smollm2"), "llama", tied=True)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")
