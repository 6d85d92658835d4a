"""The tar reader against the stdlib writer, for arbitrary contents and any truncation."""

import io
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from omnimask.train.data.tario import RawSample, TarProblem, iter_samples

exts = st.sampled_from(["png", "txt", "json", "flac", "seg.png"])
member = st.tuples(exts, st.binary(max_size=1500))
sample = st.lists(member, min_size=1, max_size=4, unique_by=lambda m: m[0])
dataset = st.lists(sample, min_size=1, max_size=6)


def _tar(samples, fmt=tarfile.USTAR_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as w:
        for i, members in enumerate(samples):
            for ext, data in members:
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                w.addfile(info, io.BytesIO(data))
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(dataset, st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_reads_what_tarfile_wrote(samples, fmt):
    buf = _tar(samples, fmt)
    got = list(iter_samples(buf))
    assert all(isinstance(g, RawSample) for g in got)
    assert [g.key for g in got] == [f"s{i:04d}" for i in range(len(samples))]
    assert [g.files for g in got] == [dict(m) for m in samples]
    assert [g.ordinal for g in got] == list(range(len(samples)))
    # every sample can be read back alone from its offset
    for g in got:
        (again,) = [s for s in iter_samples(buf, g.offset, g.ordinal, limit=1)
                    if isinstance(s, RawSample)]
        assert again.files == g.files and again.key == g.key


@settings(max_examples=60, deadline=None)
@given(dataset, st.floats(0, 1))
def test_any_truncation_yields_a_clean_prefix(samples, frac):
    buf = _tar(samples)
    cut = int(len(buf) * frac)
    items = list(iter_samples(buf[:cut]))  # never raises
    good = [s for s in items if isinstance(s, RawSample) and s.problem is None]
    for g, members in zip(good, samples):
        # a sample reported complete holds exactly the written bytes of the members it has
        for ext, data in g.files.items():
            assert dict(members)[ext] == data
    if [g.files for g in good] != [dict(m) for m in samples]:  # anything lost is reported
        assert any(isinstance(i, TarProblem) for i in items)
    assert all(isinstance(i, RawSample) for i in iter_samples(buf))  # the intact tar: no fault
