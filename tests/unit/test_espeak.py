import os

import numpy as np
import pytest

from omnimask.train.data.espeak import Espeak, Voice, get_espeak


def test_synthesis_is_bit_exact_and_voices_differ():
    tts = get_espeak()
    assert get_espeak() is tts
    with pytest.raises(RuntimeError, match="get_espeak"):
        Espeak()
    assert tts.sample_rate == 22050
    v = Voice("en-us+f3", rate=160, pitch=50, seed=1)
    a = tts.synth("a small red circle left of a blue square", v)
    other = tts.synth("a large green star", Voice("en+m3", 140, 30, 2))
    b = tts.synth("a small red circle left of a blue square", v)
    assert a.dtype == np.int16 and len(a) > tts.sample_rate  # over a second of audio
    assert np.array_equal(a, b)  # same text and voice after another utterance: same samples
    c = tts.synth("a small red circle left of a blue square", Voice("en-us+m1", 160, 50, 1))
    assert not np.array_equal(a[: len(c)], c[: len(a)])
    assert len(other) > 0


def _speak_in_worker(text: str) -> tuple[int, bytes]:
    tts = get_espeak()  # made in this worker: the parent's zygote is not used
    return tts.owner, tts.synth(text, Voice("en-us+f3", 160, 50, 1)).tobytes()


def test_a_failed_utterance_is_an_error_and_forked_workers_get_their_own():
    import multiprocessing as mp

    tts = get_espeak()
    want = tts.synth("a large green star", Voice("en-us+f3", 160, 50, 1))
    with pytest.raises(RuntimeError, match="no-such-voice"):
        tts.synth("a large green star", Voice("no-such-voice", 160, 50, 1))
    assert np.array_equal(tts.synth("a large green star", Voice("en-us+f3", 160, 50, 1)), want)
    with mp.get_context("fork").Pool(2) as pool:  # each worker its own zygote and pipes
        got = pool.map(_speak_in_worker, ["a large green star"] * 4)
    assert all(np.array_equal(np.frombuffer(b, np.int16), want) for _, b in got)
    assert os.getpid() not in {owner for owner, _ in got}
    assert get_espeak() is tts and tts.owner == os.getpid()
