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
