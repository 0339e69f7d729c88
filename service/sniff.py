"""Which modality an upload is, from its first bytes (never from its name or a client's MIME).

Used only when the client gives no ``modality``. Depth and thermal maps (PNG or .npy) look
like images or plain arrays, and CSV looks like text, so those need an explicit modality.
"""

from __future__ import annotations

import io

from encoders import Modality

from .errors import UnsupportedMedia

ACCEPTED = (
    "recognised from content: images (JPEG, PNG, GIF, WebP, BMP, TIFF), audio (WAV, FLAC, Ogg, "
    "MP3, M4A), video (MP4/MOV, WebM/MKV, AVI) and IMU .npy of shape (T, 6) or (6, T); "
    "give `modality` for depth, thermal, IMU CSV, or to override"
)

_ISO_AUDIO_BRANDS = (b"M4A ", b"M4B ", b"M4P ", b"F4A ")
_ISO_IMAGE_BRANDS = (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis")


def sniff_modality(data: bytes) -> Modality:
    """The modality of ``data`` by magic numbers; raises UnsupportedMedia saying what is known."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Modality.VISION
    if head[:6] in (b"GIF87a", b"GIF89a") or head.startswith(b"BM"):
        return Modality.VISION
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Modality.VISION
    if head.startswith(b"RIFF") and len(head) >= 12:
        kind = head[8:12]
        if kind == b"WEBP":
            return Modality.VISION
        if kind == b"WAVE":
            return Modality.AUDIO
        if kind == b"AVI ":
            return Modality.VIDEO
    if head[:4] in (b"fLaC", b"OggS") or head.startswith(b"ID3"):
        return Modality.AUDIO
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return Modality.AUDIO
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _ISO_AUDIO_BRANDS:
            return Modality.AUDIO
        if brand in _ISO_IMAGE_BRANDS:
            return Modality.VISION
        return Modality.VIDEO
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM / Matroska
        return Modality.VIDEO
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:  # MPEG audio / ADTS
        return Modality.AUDIO
    if head.startswith(b"\x93NUMPY"):
        return _sniff_npy(data)
    raise UnsupportedMedia(f"cannot tell the modality of this upload; {ACCEPTED}")


def _sniff_npy(data: bytes) -> Modality:
    from numpy.lib import format as npformat

    try:
        fp = io.BytesIO(data[:4096])
        major, _ = npformat.read_magic(fp)
        if major == 1:
            shape, _, _ = npformat.read_array_header_1_0(fp)
        else:
            shape, _, _ = npformat.read_array_header_2_0(fp)
    except Exception:
        raise UnsupportedMedia(f"a .npy upload with an unreadable header; {ACCEPTED}") from None
    if len(shape) == 2 and (shape[0] in (6, 7) or shape[1] in (6, 7)) and max(shape) > 7:
        return Modality.IMU
    raise UnsupportedMedia(
        f"a .npy array of shape {tuple(shape)} could be depth or thermal: give `modality` "
        "(depth, thermal or imu)"
    )
