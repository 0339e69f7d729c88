"""Our torch fbank against kaldi-native-fbank, an independent Kaldi implementation.

At 128 bins (the model's setting) kaldi-native-fbank refuses 16 kHz input (a mel bin would
be empty); there the fixture, made with torchaudio's Kaldi fbank, is the reference (test_audio).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.config import PreprocessConfig
from encoders.transforms.audio import waveform_to_fbank

knf = pytest.importorskip("kaldi_native_fbank")


def _reference(x: np.ndarray, sr: int, bins: int) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.samp_freq = sr
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = bins
    opts.use_energy = False
    opts.htk_compat = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sr, x.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize(("bins", "seed"), [(80, 0), (80, 1), (64, 2)])
def test_fbank_matches_kaldi_native_fbank(bins: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Noise plus a tone and a DC offset: every part of the Kaldi pipeline matters.
    t = np.arange(16000 * 3) / 16000
    x = 0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05
    x = x.astype(np.float32)
    ref = _reference(x, 16000, bins)
    got = waveform_to_fbank(torch.from_numpy(x), 16000, PreprocessConfig(audio_mel_bins=bins))
    got_np = got.numpy()
    assert got_np.shape == ref.shape
    # Log energies: float32 FFTs of two libraries differ by rounding, which the log magnifies
    # only in near-empty bins (values around -15); hence atol plus a relative term.
    np.testing.assert_allclose(got_np, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(got_np - ref).mean() < 1e-5
