"""Preprocessing runs on one intra-op thread in the calling thread and gives the caller its own setting back;
the setting is per thread, so an encoder in another thread keeps its threads."""

from __future__ import annotations

import threading

import pytest
import torch

from hctembed.preprocessing.threads import intra_op_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_the_callers_count_restored(two_threads):
    with intra_op_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), intra_op_threads():
        raise RuntimeError("a bad scan")
    assert torch.get_num_threads() == 2


def test_the_setting_is_per_thread(two_threads):
    seen = {}
    entered, done = threading.Event(), threading.Event()

    def preprocessing_thread():
        with intra_op_threads():
            seen["inside"] = torch.get_num_threads()
            entered.set()
            done.wait(timeout=10)  # the main thread looks while this one is still inside

    worker = threading.Thread(target=preprocessing_thread)
    worker.start()
    assert entered.wait(timeout=10)
    main_count = torch.get_num_threads()
    done.set()
    worker.join()
    assert seen["inside"] == 1 and main_count == 2


def test_preprocess_leaves_the_callers_threads(two_threads):
    import numpy as np

    from hctembed.config import PreprocessConfig
    from hctembed.preprocessing import preprocess
    from hctembed.volume import Volume

    hu = np.full((40, 48, 48), -1000.0, np.float32)
    hu[8:32, 10:38, 10:38] = 40.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    x = preprocess(Volume(array=hu, affine=affine), config=PreprocessConfig(pad_size=64, crop_size=48, out_size=24))
    assert x.shape == (3, 24, 24, 24) and torch.get_num_threads() == 2


def test_a_thread_started_during_preprocessing_gets_the_process_count(two_threads):
    """A new thread inherits whatever count was set last, even by a block in another thread; an encoder thread
    that starts with use_process_threads (as serve's query threads do) gets the process's own count."""
    from hctembed.preprocessing.threads import use_process_threads

    seen = {}
    entered, done = threading.Event(), threading.Event()

    def preprocessing_thread():
        with intra_op_threads():
            entered.set()
            done.wait(timeout=10)

    def encoder_thread():
        use_process_threads()
        seen["encoder"] = torch.get_num_threads()

    worker = threading.Thread(target=preprocessing_thread)
    worker.start()
    assert entered.wait(timeout=10)
    encoder = threading.Thread(target=encoder_thread)
    encoder.start()
    encoder.join()
    done.set()
    worker.join()
    assert seen["encoder"] == 2
