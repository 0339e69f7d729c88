"""Which modality a file is: the one format registry.

Every caller that has a file and no modality asks ``detect``: the index scan, ``bindsearch
embed`` and ``index query`` without ``-m``, the upload routes and the web page (through them).
The decoders ask ``audio_demuxer``/``video_demuxer`` which FFmpeg demuxer opens a file, and
``content_format`` what their input is; they only decode. The rule (content decides the
family, a name hint decides within it) is written out in docs/modalities.md, "Which modality
is a file?"; ``RULE`` is its short form for ``--help`` texts.
"""

from __future__ import annotations

import csv
import io
import struct
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from .errors import InvalidInput
from .modality import Modality

__all__ = [
    "ACCEPTED",
    "HEAD_BYTES",
    "RULE",
    "Detection",
    "UnsupportedFormat",
    "audio_demuxer",
    "content_format",
    "describe",
    "detect",
    "name_hint",
    "read_head",
    "video_demuxer",
]

HEAD_BYTES = 4096  # all that detection reads from a file

ACCEPTED = (
    "accepted: images (JPEG, PNG, GIF, WebP, BMP, TIFF), audio (WAV, FLAC, Ogg, MP3, AAC, AIFF, "
    "M4A, MKA/WebA), video (MP4/MOV, WebM/MKV, AVI), depth and thermal maps (PNG, .npy (H, W)), "
    "IMU traces (.npy (T, 6), .csv) and text files (.txt, .md, .text)"
)

# The one-paragraph rule for ``--help`` and the OpenAPI description (docs/modalities.md has it all).
RULE = (
    "Without a modality, the content decides (never the extension): a 16-bit greyscale PNG is "
    "depth, other PNGs are vision; a .npy of shape (T, 6) or (6, T) is IMU, other 2-D .npy "
    "arrays are depth; .csv is IMU; .txt/.md/.text is text. A depth/thermal/imu folder or a "
    "double extension (scan.depth.png, night.thermal.png, walk.imu.csv) names depth, thermal "
    "or IMU; thermal always needs such a name or an explicit modality."
)

TEXT_SUFFIXES = (".txt", ".md", ".text")
HINTS = {"depth": Modality.DEPTH, "thermal": Modality.THERMAL, "imu": Modality.IMU}

_BMFF_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})
_BMFF_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_BMFF_IMAGE_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)
_BMFF_AUDIO_NAMES = (".m4a", ".m4b")
# A BMP's info header starts with its own size: BITMAPCOREHEADER (12) ... BITMAPV5HEADER (124).
_BMP_DIB_SIZES = frozenset(struct.pack("<I", n) for n in (12, 16, 40, 52, 56, 64, 108, 124))
_MATROSKA_AUDIO_NAMES = (".mka", ".weba")

# Content formats -> the family they belong to, where the format alone decides.
_VISION = frozenset({"jpeg", "gif", "bmp", "tiff", "webp"})
_AUDIO = frozenset({"wav", "flac", "ogg", "mp3", "aac", "aiff", "m4a"})
_VIDEO = frozenset({"mp4", "avi"})
_NAMES = {
    "jpeg": "a JPEG image",
    "png": "a PNG image",
    "gif": "a GIF image",
    "bmp": "a BMP image",
    "tiff": "a TIFF image",
    "webp": "a WebP image",
    "heif": "a HEIC/HEIF image",
    "avif": "an AVIF image",
    "wav": "WAV audio",
    "flac": "FLAC audio",
    "ogg": "an Ogg file",
    "mp3": "MP3 audio",
    "aac": "AAC audio",
    "aiff": "AIFF audio",
    "m4a": "M4A audio",
    "mp4": "an MP4/MOV file",
    "matroska": "a Matroska/WebM file",
    "avi": "an AVI file",
    "npy": "a .npy array",
    "text": "text",
    "zip": "a zip archive (.npz?)",
    "pdf": "a PDF document",
    "riff": "a RIFF file of another kind",
    "unknown": "unrecognised binary data",
}


class UnsupportedFormat(InvalidInput):
    """A file whose modality cannot be told; the message says why and what is accepted."""


@dataclass(frozen=True)
class Detection:
    """What ``detect`` found: a modality, or the reason there is none."""

    modality: Modality | None
    format: str  # what the content is: "png", "wav", "npy", "text", ... ("unknown")
    reason: str | None = None  # why ``modality`` is None: one line, ends with what is accepted

    def require(self) -> Modality:
        """The modality, or ``UnsupportedFormat`` with the reason."""
        if self.modality is None:
            raise UnsupportedFormat(self.reason or "cannot tell the modality")
        return self.modality


def read_head(path: str | Path) -> bytes:
    """The first ``HEAD_BYTES`` of a file (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def detect(
    source: str | Path | bytes, name: str | PurePath | None = None, root: Path | None = None
) -> Detection:
    """The modality of a file (a path, or its bytes) by its content, helped by its name.

    Args:
        name: the name to take hints from; a path's own name when ``source`` is a path, an
            upload's file name for bytes (None: no hint, e.g. an upload without a name).
        root: for a path in a corpus: hints come from folders below ``root``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:HEAD_BYTES])
    else:
        try:
            head = read_head(source)
        except OSError as e:
            return Detection(None, "unknown", f"cannot read the file ({e.strerror or e})")
        if name is None:
            name = Path(source)
    if not head:
        return Detection(None, "unknown", "the file is empty (0 bytes)")
    fmt = content_format(head)
    suffix = PurePosixPath(str(name)).suffix.lower() if name is not None else ""
    hint = name_hint(name, root) if name is not None else None
    if fmt == "png":
        if hint in (Modality.DEPTH, Modality.THERMAL):
            return Detection(hint, fmt)
        bits, colour = _png_depth_colour(head)
        return Detection(Modality.DEPTH if bits == 16 and colour == 0 else Modality.VISION, fmt)
    if fmt == "npy":
        return _npy(head, hint)
    if fmt == "text":
        return _text(head, suffix, hint)
    if fmt in _VISION:
        return Detection(Modality.VISION, fmt)
    if fmt in ("heif", "avif"):
        if _image_loader_reads(fmt):
            return Detection(Modality.VISION, fmt)
        return Detection(
            None,
            fmt,
            f"{_NAMES[fmt]}: this image format is not supported; "
            "accepted images: JPEG, PNG, GIF, WebP, BMP, TIFF",
        )
    if fmt in _AUDIO or (fmt == "mp4" and suffix in _BMFF_AUDIO_NAMES):
        return Detection(Modality.AUDIO, fmt)
    if fmt == "matroska":
        return Detection(Modality.AUDIO if suffix in _MATROSKA_AUDIO_NAMES else Modality.VIDEO, fmt)
    if fmt in _VIDEO:
        return Detection(Modality.VIDEO, fmt)
    return Detection(None, fmt, f"unsupported file type ({_NAMES[fmt]}); {ACCEPTED}")


def content_format(head: bytes) -> str:
    """What the bytes are by their magic numbers, never by a name ("unknown" if nothing fits)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and head[14:18] in _BMP_DIB_SIZES:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"RIFF"):
        return {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}.get(head[8:12], "riff")
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] != 0xFF:
        # MPEG audio frame sync (11 bits set); ADTS AAC shares it and is told apart by layer 0.
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    if head[4:8] in _BMFF_BOXES:  # `ftyp` from every current muxer, others in old QuickTime
        return _bmff(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML header: Matroska and WebM
        return "matroska"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"%PDF"):
        return "pdf"
    if _is_text(head):
        return "text"
    return "unknown"


def describe(head: bytes) -> str:
    """A short name for what the bytes are, for error messages ("a PNG image", "text")."""
    return _NAMES[content_format(head)]


def name_hint(name: str | PurePath, root: Path | None = None) -> Modality | None:
    """Depth, thermal or IMU when the name says so (double extension, then folders), else None.

    Args:
        root: folders below it count; without it, only the file's own folder.
    """
    path = PurePath(name)
    for part in path.name.lower().split(".")[1:-1]:  # double extension: name.depth.png
        if part in HINTS:
            return HINTS[part]
    folders: tuple[str, ...] = path.parent.parts[-1:]
    if root is not None:
        try:
            folders = path.parent.relative_to(root).parts
        except ValueError:
            pass  # not below root: its own folder only
    for folder in reversed(folders):
        if folder.lower() in HINTS:
            return HINTS[folder.lower()]
    return None


def audio_demuxer(head: bytes) -> str | None:
    """The FFmpeg demuxer that opens an audio file with these first bytes, or None.

    FFmpeg is never left to guess: its probing also accepts playlists (HLS, concat) that make
    it open other files or URLs, which an upload must never be able to do.
    """
    fmt = content_format(head)
    if fmt in ("mp4", "m4a"):
        return "mov"  # M4A/AAC in MP4, MOV soundtracks
    return {
        "matroska": "matroska",
        "ogg": "ogg",
        "flac": "flac",
        "wav": "wav",
        "mp3": "mp3",
        "aac": "aac",
    }.get(fmt)


def video_demuxer(head: bytes) -> str | None:
    """The FFmpeg demuxer that opens a video file with these first bytes, or None."""
    fmt = content_format(head)
    if fmt in ("mp4", "m4a"):
        return "mov"  # FFmpeg's one demuxer for mov/mp4/m4a/3gp/3g2/mj2
    return {"matroska": "matroska", "avi": "avi"}.get(fmt)


# --- helpers ------------------------------------------------------------------------------------


def _bmff(head: bytes) -> str:
    """ISO-BMFF: audio, image or video by the brands of its ``ftyp`` box."""
    if head[4:8] != b"ftyp":
        return "mp4"  # an old QuickTime file that starts with another box
    size = struct.unpack(">I", head[:4])[0]
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
    major = head[8:12]
    if major in _BMFF_AUDIO_BRANDS:
        return "m4a"
    if major in _BMFF_IMAGE_BRANDS:
        return "avif" if b"avif" in brands or b"avis" in brands else "heif"
    return "mp4"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the end of the head is still text.
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def _png_depth_colour(head: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk; colour type 0 is greyscale."""
    if len(head) < 26 or head[12:16] != b"IHDR":
        return 8, 2  # malformed: the image loader says what is wrong with it
    bits, colour = struct.unpack(">BB", head[24:26])
    return int(bits), int(colour)


def _npy(head: bytes, hint: Modality | None) -> Detection:
    import numpy.lib.format as npformat

    try:
        fp = io.BytesIO(head)
        major, _ = npformat.read_magic(fp)
        read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
        shape = tuple(int(n) for n in read(fp)[0])
    except Exception as e:  # numpy reports malformed headers with many types
        return Detection(None, "npy", f"malformed .npy header ({e}); {ACCEPTED}")
    if hint is not None:
        return Detection(hint, "npy")
    if len(shape) == 2:
        t, c = shape if shape[1] in (6, 7) else shape[::-1]
        if c in (6, 7) and t > 8:
            return Detection(Modality.IMU, "npy")
        return Detection(Modality.DEPTH, "npy")
    if len(shape) == 3 and 1 in (shape[0], shape[2]):
        return Detection(Modality.DEPTH, "npy")
    return Detection(
        None,
        "npy",
        f"unsupported .npy shape {shape}; accepted: depth/thermal maps (H, W), (1, H, W) or "
        "(H, W, 1), IMU traces (T, 6), (6, T), (T, 7) or (7, T)",
    )


def _text(head: bytes, suffix: str, hint: Modality | None) -> Detection:
    if suffix in TEXT_SUFFIXES:
        return Detection(Modality.TEXT, "text")
    if suffix == ".csv" or hint is Modality.IMU:
        if _is_manifest(head):
            return Detection(
                None,
                "text",
                "an index manifest (a CSV with a 'path' column), not an IMU trace; "
                "accepted IMU CSV: accelerometer and gyroscope columns",
            )
        return Detection(Modality.IMU, "text")
    what = f"extension {suffix!r}" if suffix else "no extension"
    return Detection(
        None,
        "text",
        f"unsupported file type (text with {what}); accepted text: .txt, .md or .text, "
        "IMU CSV: .csv",
    )


def _is_manifest(head: bytes) -> bool:
    first = head.decode("utf-8", errors="ignore").splitlines()[:1]
    header = next(csv.reader(first), []) if first else []
    return "path" in [h.strip().lower() for h in header]


def _image_loader_reads(fmt: str) -> bool:
    """Whether the vision loader decodes this ISO-BMFF image format in this install."""
    from PIL import Image

    from .transforms.vision import ACCEPTED_FORMATS

    name = fmt.upper()
    Image.init()
    return name in ACCEPTED_FORMATS and name in Image.OPEN
